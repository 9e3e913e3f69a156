//! The node's DICOM receiver driven by clients no one here wrote: dcmtk's `echoscu` and
//! `storescu` (Debian's dcmtk, installed by `make test`) and pynetdicom (PyPI), against the
//! real node binary on loopback.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cxrfed_e2e::{
    NodeProcess, all_bytes, contains, cxrfed, free_port, pydicom_data_dir, text, venv_python,
    workspace_root, write_phantoms,
};

const AE: &str = "CXRFED";

/// A dcmtk (or dicom3tools) program: the first on PATH outside a Python virtualenv (pynetdicom installs its
/// own `echoscu`/`storescu` apps into the venv's bin, which the suite puts first).
fn dcmtk_bin(program: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .filter(|dir| !dir.join("../pyvenv.cfg").exists())
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("/usr/bin").join(program))
}

fn dcmtk(program: &str, args: &[&str]) -> Output {
    Command::new(dcmtk_bin(program))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program} (dcmtk; `make test-deps` installs it): {e}"))
}

fn echoscu(port: u16, calling: &str, extra: &[&str]) -> Output {
    let port = port.to_string();
    let mut args = vec!["-aet", calling, "-aec", AE];
    args.extend_from_slice(extra);
    args.extend(["127.0.0.1", &port]);
    dcmtk("echoscu", &args)
}

/// What one or more `storescu` runs reported.
struct Sent {
    /// C-STORE responses with status Success.
    stored: usize,
    /// Files not stored: a refusal status, or not sent at all.
    failed: usize,
    output: String,
}

/// The storescu option that proposes a file's (compressed) transfer syntax beside the
/// uncompressed ones, as a PACS proposes what it holds; `None` for uncompressed files.
fn proposal(file: &str) -> Option<&'static str> {
    let object = dicom_object::OpenFileOptions::new()
        .read_until(dicom_dictionary_std::tags::PIXEL_DATA)
        .open_file(file)
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    match object.meta().transfer_syntax().trim_end_matches('\0') {
        "1.2.840.10008.1.2.5" => Some("-xr"),
        "1.2.840.10008.1.2.4.57" | "1.2.840.10008.1.2.4.70" => Some("-xs"),
        "1.2.840.10008.1.2.4.50" | "1.2.840.10008.1.2.4.51" => Some("-xy"),
        "1.2.840.10008.1.2.4.90" => Some("-xv"),
        "1.2.840.10008.1.2.4.91" => Some("-xw"),
        "1.2.840.10008.1.2.1.99" => Some("-xd"),
        _ => None,
    }
}

/// dcmtk's storescu (verbose), one run per proposed transfer syntax group. storescu's exit
/// status is 0 even when a store fails, so the responses are counted from its output.
fn storescu(port: u16, calling: &str, extra: &[&str], files: &[&str]) -> Sent {
    let mut groups: std::collections::BTreeMap<Option<&str>, Vec<&str>> = Default::default();
    for file in files {
        groups.entry(proposal(file)).or_default().push(file);
    }
    let port = port.to_string();
    let mut sent = Sent {
        stored: 0,
        failed: 0,
        output: String::new(),
    };
    for (flag, group) in groups {
        let mut args = vec!["-v", "-aet", calling, "-aec", AE, "-nh"];
        args.extend(flag);
        args.extend_from_slice(extra);
        args.extend(["127.0.0.1", &port]);
        args.extend_from_slice(&group);
        let output = both(&dcmtk("storescu", &args));
        let stored = output.matches("Received Store Response (Success)").count();
        sent.stored += stored;
        sent.failed += group.len().saturating_sub(stored);
        sent.output.push_str(&output);
    }
    sent
}

/// An uncompressed (native pixel data) DICOM file in `dir`.
fn dicoms_uncompressed(dir: &Path) -> String {
    std::fs::read_dir(dir)
        .expect("phantoms")
        .flatten()
        .map(|e| e.path().to_str().expect("utf-8 path").to_string())
        .find(|p| p.ends_with(".dcm") && proposal(p).is_none())
        .expect("an uncompressed phantom")
}

fn both(out: &Output) -> String {
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

fn rg1(name: &str) -> String {
    pydicom_data_dir()
        .join(name)
        .to_str()
        .expect("utf-8 path")
        .to_string()
}

fn record_count(node: &NodeProcess) -> usize {
    let out = node.cli(&["records", "--limit", "100000"]);
    assert!(out.status.success(), "records: {}", text(&out.stderr));
    text(&out.stdout).lines().count()
}

fn node_status(node: &NodeProcess) -> String {
    let profile = node.profile();
    let out = cxrfed(&[
        "node",
        "status",
        "--data-dir",
        node.data_dir_str(),
        "--profile",
        &profile,
    ]);
    text(&out.stdout)
}

/// The DICOM port of a running node, from `node status` (the receiver binds its port, 0 here,
/// just after the gRPC one).
fn dicom_port(node: &NodeProcess) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = node_status(node);
        if let Some(port) = status
            .lines()
            .find_map(|l| l.trim().strip_prefix("DICOM:"))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|addr| addr.trim_end_matches(':').rsplit(':').next())
            .and_then(|p| p.parse().ok())
        {
            return port;
        }
        assert!(Instant::now() < deadline, "no DICOM receiver in: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A node with its DICOM receiver on a port of the kernel's choosing; returns the port.
fn start(dir: &Path, extra: &[&str]) -> (NodeProcess, u16) {
    let mut args = vec!["--dicom-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let node = NodeProcess::start(dir, &args);
    let port = dicom_port(&node);
    (node, port)
}

/// RG1's identifiers and original UIDs, read with pydicom.
fn rg1_identifiers() -> Vec<String> {
    let out = Command::new(venv_python())
        .arg("-c")
        .arg(
            "import pydicom, json, sys; ds = pydicom.dcmread(sys.argv[1]); \
             print(json.dumps([str(ds.get(k, '')) for k in \
             ['PatientName', 'PatientID', 'PatientBirthDate', 'AccessionNumber', \
              'StudyInstanceUID', 'SeriesInstanceUID', 'SOPInstanceUID']]))",
        )
        .arg(rg1("RG1_UNCR.dcm"))
        .output()
        .expect("python");
    let ids: Vec<String> = serde_json::from_slice(&out.stdout).expect("identifiers");
    ids.into_iter().filter(|s| s.trim().len() >= 3).collect()
}

#[test]
fn dcmtk_echo_and_store_with_allow_list_negotiation_and_no_identifiers_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, port) = start(
        dir.path(),
        &["--dicom-allow", "PACS", "--dicom-allow", "ROUTER@127.0.0.1"],
    );

    // C-ECHO from an allowed caller; a caller not on the list is rejected at association.
    let ok = echoscu(port, "PACS", &[]);
    assert!(ok.status.success(), "echoscu: {}", both(&ok));
    let evil = echoscu(port, "EVIL", &[]);
    assert!(!evil.status.success(), "EVIL was let in: {}", both(&evil));
    assert!(
        both(&evil)
            .to_lowercase()
            .contains("calling ae title not recogni"),
        "{}",
        both(&evil)
    );
    // The wrong called AE title is rejected too.
    let out = dcmtk(
        "echoscu",
        &[
            "-aet",
            "PACS",
            "-aec",
            "SOMEONE",
            "127.0.0.1",
            &port.to_string(),
        ],
    );
    assert!(!out.status.success());
    assert!(
        both(&out)
            .to_lowercase()
            .contains("called ae title not recogni"),
        "{}",
        both(&out)
    );

    // RG1 in explicit little endian, then its lossless JPEG 2000 copy: one record.
    let out = storescu(port, "ROUTER", &[], &[&rg1("RG1_UNCR.dcm")]);
    assert_eq!(out.stored, 1, "storescu: {}", out.output);
    assert_eq!(record_count(&node), 1);
    let out = storescu(port, "ROUTER", &[], &[&rg1("RG1_J2KR.dcm")]);
    assert_eq!(out.stored, 1, "storescu J2K: {}", out.output);
    assert_eq!(
        record_count(&node),
        1,
        "the lossless J2K copy de-duplicates"
    );

    // A folder of phantoms, every transfer syntax the generator writes.
    let phantoms = tempfile::tempdir().expect("tempdir");
    write_phantoms(phantoms.path(), 8, 77, 256);
    let dicoms: Vec<String> = std::fs::read_dir(phantoms.path())
        .expect("phantoms")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "dcm"))
        .map(|p| p.to_str().expect("utf-8 path").to_string())
        .collect();
    let syntaxes: std::collections::BTreeSet<_> = dicoms.iter().map(|f| proposal(f)).collect();
    assert!(syntaxes.len() >= 3, "phantoms in {syntaxes:?}");
    let files: Vec<&str> = dicoms.iter().map(String::as_str).collect();
    let out = storescu(port, "PACS", &[], &files);
    assert_eq!(out.stored, dicoms.len(), "storescu folder: {}", out.output);
    let dicoms = dicoms.len();
    assert_eq!(record_count(&node), 1 + dicoms);

    // A presentation context with only JPEG-LS (not decoded by the node) is refused at
    // negotiation; the explicit little endian one beside it is accepted.
    let script = "import json, sys\nfrom pynetdicom import AE\n\
        ae = AE(ae_title='PACS')\n\
        ae.add_requested_context('1.2.840.10008.5.1.4.1.1.1', ['1.2.840.10008.1.2.4.80'])\n\
        ae.add_requested_context('1.2.840.10008.5.1.4.1.1.1', ['1.2.840.10008.1.2.1'])\n\
        assoc = ae.associate('127.0.0.1', int(sys.argv[1]), ae_title='CXRFED')\n\
        print(json.dumps({'established': assoc.is_established,\n\
          'rejected': [[c.context_id, c.result] for c in assoc.rejected_contexts],\n\
          'accepted': [c.transfer_syntax[0] for c in assoc.accepted_contexts]}))\n\
        assoc.release()\n";
    let out = Command::new(venv_python())
        .args(["-c", script, &port.to_string()])
        .output()
        .expect("python");
    let negotiated: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", both(&out)));
    assert_eq!(negotiated["established"], true, "{negotiated}");
    assert_eq!(
        negotiated["rejected"],
        serde_json::json!([[1, 4]]),
        "the JPEG-LS context (id 1) refused with 'transfer syntaxes not supported': {negotiated}"
    );
    assert_eq!(
        negotiated["accepted"],
        serde_json::json!(["1.2.840.10008.1.2.1"])
    );

    // A hostile instance (an uncompressed phantom whose header claims 60000 rows) is refused
    // with Cannot Understand and the reason, not Out of Resources: resending cannot help.
    let uncompressed = dicoms_uncompressed(phantoms.path());
    let script = "import json, sys, pydicom\nfrom pynetdicom import AE\n\
        ds = pydicom.dcmread(sys.argv[2])\nds.Rows = 60000\n\
        ae = AE(ae_title='PACS')\n\
        ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])\n\
        assoc = ae.associate('127.0.0.1', int(sys.argv[1]), ae_title='CXRFED')\n\
        rsp = assoc.send_c_store(ds)\n\
        print(json.dumps({'status': int(rsp.Status), 'comment': str(rsp.get('ErrorComment', ''))}))\n\
        assoc.release()\n";
    let out = Command::new(venv_python())
        .args(["-c", script, &port.to_string(), &uncompressed])
        .output()
        .expect("python");
    let answer: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", both(&out)));
    assert_eq!(answer["status"], 0xC000, "{answer}");
    assert!(
        answer["comment"]
            .as_str()
            .unwrap_or_default()
            .contains("dimensions"),
        "{answer}"
    );
    assert_eq!(record_count(&node), 1 + dicoms);

    // node status reports the receiver; RG1's identifiers and UIDs are nowhere.
    let status = node_status(&node);
    assert!(
        status.contains("DICOM:          CXRFED on 127.0.0.1"),
        "{status}"
    );
    assert!(status.contains("calling_ae_not_allowed: 1"), "{status}");
    assert!(status.contains("1 already present"), "{status}");
    assert!(status.contains("dimensions_too_large: 1"), "{status}");
    let out = cxrfed(&["node", "stop", "--data-dir", node.data_dir_str()]);
    assert!(out.status.success());
    let mut node = node;
    node.wait_exit(Duration::from_secs(30)).expect("stopped");
    let stored = all_bytes(dir.path());
    let identifiers = rg1_identifiers();
    assert!(identifiers.len() >= 5, "{identifiers:?}");
    for id in &identifiers {
        assert!(!contains(&stored, id), "the data directory carries {id:?}");
    }
    let log = std::fs::read_to_string(dir.path().join("logs/node.log")).expect("log");
    assert!(log.contains("DICOM instance stored"), "{log}");
}

#[test]
fn a_full_queue_answers_out_of_resources_and_retries_succeed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, port) = start(
        dir.path(),
        &[
            "--dicom-allow",
            "*",
            "--dicom-queue",
            "1",
            "--decode-workers",
            "1",
        ],
    );
    // Four senders at once, each with a copy of RG1 (7 MB, ~1 s through the pipeline in a
    // debug build): with one slot, the others are answered A700 while it is busy.
    let copies = [
        "RG1_UNCR.dcm",
        "RG1_J2KR.dcm",
        "RG1_UNCR.dcm",
        "RG1_J2KR.dcm",
    ];
    let senders: Vec<_> = copies
        .iter()
        .map(|name| {
            let file = rg1(name);
            std::thread::spawn(move || storescu(port, "PACS", &[], &[&file]))
        })
        .collect();
    let first: Vec<Sent> = senders
        .into_iter()
        .map(|t| t.join().expect("sender thread"))
        .collect();
    let refused: Vec<&Sent> = first.iter().filter(|o| o.failed > 0).collect();
    let status = node_status(&node);
    assert!(
        !refused.is_empty() && status.contains("queue_full"),
        "expected at least one A700 refusal: {status}"
    );
    for out in refused {
        let lower = out.output.to_lowercase();
        assert!(
            lower.contains("out of resources") || lower.contains("outofresources"),
            "refused with another status: {}",
            out.output
        );
    }
    // The senders retry the refused files one at a time: all succeed, one record in all
    // (every copy is RG1, losslessly).
    for name in copies {
        let out = storescu(port, "PACS", &[], &[&rg1(name)]);
        assert_eq!(out.stored, 1, "retry of {name}: {}", out.output);
    }
    assert_eq!(record_count(&node), 1);
}

#[test]
fn dicom_tls_with_the_node_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, port) = start(dir.path(), &["--dicom-allow", "PACS", "--dicom-tls"]);
    let ca = node.pki.ca_pem();
    let ca = ca.to_str().expect("utf-8 path");
    let out = echoscu(port, "PACS", &["+tla", "+cf", ca]);
    assert!(out.status.success(), "echoscu over TLS: {}", both(&out));
    let out = storescu(port, "PACS", &["+tla", "+cf", ca], &[&rg1("RG1_UNCR.dcm")]);
    assert_eq!(out.stored, 1, "storescu over TLS: {}", out.output);
    assert_eq!(record_count(&node), 1);
    // The DICOM port follows a rotation of the node's certificate, as the gRPC port does:
    // the certificate a new TLS connection gets is the new one.
    let served = || -> String {
        let out = Command::new(venv_python())
            .args([
                "-c",
                "import ssl, sys, hashlib; pem = ssl.get_server_certificate(('127.0.0.1', int(sys.argv[1]))); \
                 print(hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest())",
                &port.to_string(),
            ])
            .output()
            .expect("python");
        text(&out.stdout).trim().to_string()
    };
    let node_dir = node.pki.root.join("node-local");
    let fingerprint = |dir: &Path| -> String {
        cxrfed_auth::pki::inspect(&dir.join(cxrfed_auth::pki::CERT))
            .expect("inspect")
            .fingerprint_sha256
    };
    let before = fingerprint(&node_dir);
    assert_eq!(
        served(),
        before,
        "the DICOM port serves the node's certificate"
    );
    let ca_dir = node.pki.root.join("ca");
    let out = cxrfed(&[
        "certs",
        "issue",
        "--ca",
        ca_dir.to_str().expect("path"),
        "--role",
        "node",
        "--name",
        "node-local",
        "--site",
        "local",
        "--force",
        "--out",
        node_dir.to_str().expect("path"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let after = fingerprint(&node_dir);
    assert_ne!(before, after);
    let deadline = Instant::now() + Duration::from_secs(20);
    while served() != after {
        assert!(
            Instant::now() < deadline,
            "the DICOM port kept the old certificate"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = echoscu(port, "PACS", &["+tla", "+cf", ca]);
    assert!(
        out.status.success(),
        "echoscu after rotation: {}",
        both(&out)
    );

    // Plaintext to the TLS port gets nowhere.
    let out = echoscu(port, "PACS", &[]);
    assert!(
        !out.status.success(),
        "plaintext echo succeeded on the TLS port"
    );
    let status = node_status(&node);
    assert!(status.contains("tls_handshake_failed: 1"), "{status}");
}

/// The pynetdicom sender's result lines: (file, status or None).
fn sender_results(stdout: &[u8]) -> Vec<(String, Option<u64>)> {
    text(stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| {
            (
                v["file"].as_str().unwrap_or_default().to_string(),
                v["status"].as_u64(),
            )
        })
        .collect()
}

fn file_list(dir: &Path, files: &[PathBuf]) -> PathBuf {
    let list = dir.join(format!("files-{}.txt", files.len()));
    let lines: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    std::fs::write(&list, lines.join("\n")).expect("file list");
    list
}

#[test]
fn pynetdicom_200_instances_on_4_associations_survive_sigkill_exactly_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let work = tempfile::tempdir().expect("tempdir");
    let phantoms = work.path().join("phantoms");
    write_phantoms(&phantoms, 200, 5, 128);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&phantoms)
        .expect("phantoms")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "dcm"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 200);
    let sender = workspace_root().join("tests/helpers/dicom_sender.py");
    let grpc_port = free_port();
    let allow = ["--dicom-allow", "ROUTER"];
    let mut node = {
        let mut args = vec!["--dicom-listen", "127.0.0.1:0"];
        args.extend_from_slice(&allow);
        NodeProcess::start_on(dir.path(), grpc_port, &args)
    };
    let port = dicom_port(&node);

    // Send all 200 on 4 associations; SIGKILL the node once 40 have been acknowledged.
    let list = file_list(work.path(), &files);
    let mut child = Command::new(venv_python())
        .arg(&sender)
        .args(["127.0.0.1", &port.to_string(), AE, "ROUTER", "4"])
        .arg(&list)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("sender");
    let stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            lines.push(line);
        }
        lines
    });
    let progress = dir.path().join("logs/node.log");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let log = std::fs::read_to_string(&progress).unwrap_or_default();
        if log.matches("DICOM instance stored").count() >= 40 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node did not store 40 instances"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    node.kill();
    let _ = child.wait();
    let lines = reader.join().expect("reader").join("\n");
    let results = sender_results(lines.as_bytes());
    let acknowledged: Vec<PathBuf> = results
        .iter()
        .filter(|(_, s)| *s == Some(0))
        .map(|(f, _)| PathBuf::from(f))
        .collect();
    assert!(
        acknowledged.len() >= 40 && acknowledged.len() < 200,
        "{} acknowledged before the kill",
        acknowledged.len()
    );

    // Restarted on the same data directory: every acknowledged instance is there (re-sending
    // them stores nothing new), then the rest is sent and stored once.
    let mut node = {
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["--dicom-listen", listen.as_str()];
        args.extend_from_slice(&allow);
        NodeProcess::start_on(dir.path(), grpc_port, &args)
    };
    assert_eq!(dicom_port(&node), port, "restarted on the same DICOM port");
    let before = record_count(&node);
    assert!(
        before >= acknowledged.len(),
        "{before} records < {} acknowledged",
        acknowledged.len()
    );
    let list = file_list(work.path(), &acknowledged);
    let out = Command::new(venv_python())
        .arg(&sender)
        .args(["127.0.0.1", &port.to_string(), AE, "ROUTER", "4"])
        .arg(&list)
        .output()
        .expect("sender");
    let resent = sender_results(&out.stdout);
    assert_eq!(resent.len(), acknowledged.len());
    assert!(resent.iter().all(|(_, s)| *s == Some(0)), "{resent:?}");
    assert_eq!(
        record_count(&node),
        before,
        "every acknowledged instance was already stored"
    );

    let list = file_list(work.path(), &files);
    let out = Command::new(venv_python())
        .arg(&sender)
        .args(["127.0.0.1", &port.to_string(), AE, "ROUTER", "4"])
        .arg(&list)
        .output()
        .expect("sender");
    let all = sender_results(&out.stdout);
    assert_eq!(all.len(), 200, "{}", text(&out.stderr));
    assert!(all.iter().all(|(_, s)| *s == Some(0)), "{all:?}");
    assert_eq!(
        record_count(&node),
        200,
        "each instance stored exactly once"
    );
    node.kill();
}

#[test]
fn records_export_as_tid_1500_sr_and_fhir_r4_read_by_highdicom_dcmtk_and_fhirclient_and_sent_to_a_pacs()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, port) = start(dir.path(), &["--dicom-allow", "PACS"]);
    let phantoms = tempfile::tempdir().expect("tempdir");
    write_phantoms(phantoms.path(), 3, 11, 128);
    let mut files: Vec<String> = std::fs::read_dir(phantoms.path())
        .expect("phantoms")
        .flatten()
        .map(|e| e.path().to_str().expect("utf-8 path").to_string())
        .filter(|p| p.ends_with(".dcm"))
        .collect();
    files.push(rg1("RG1_UNCR.dcm"));
    let refs: Vec<&str> = files.iter().map(String::as_str).collect();
    let sent = storescu(port, "PACS", &[], &refs);
    assert_eq!(sent.stored, files.len(), "{}", sent.output);
    let out = node.cli(&["records", "--limit", "100"]);
    let records: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .collect();
    let record_ids: Vec<String> = records
        .iter()
        .map(|r| r["record_id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(record_ids.len(), files.len());

    // One SR per record, named by its SOP Instance UID; a second export writes the same
    // files (the UIDs derive from the record ids).
    let srs = tempfile::tempdir().expect("tempdir");
    let sr_dir = srs.path().to_str().expect("utf-8 path");
    let out = node.cli(&["export", "--format", "dicom-sr", "--out", sr_dir]);
    assert!(out.status.success(), "export: {}", text(&out.stderr));
    let listing = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let first = listing(srs.path());
    assert_eq!(first.len(), files.len(), "{first:?}");
    let out = node.cli(&["export", "--format", "dicom-sr", "--out", sr_dir]);
    assert!(out.status.success());
    assert_eq!(
        listing(srs.path()),
        first,
        "a re-export gives the same SR instances"
    );

    // highdicom reads every file as a TID 1500 report with one image-level group.
    let paths: Vec<String> = first
        .iter()
        .map(|n| srs.path().join(n).to_str().expect("utf-8 path").to_string())
        .collect();
    let out = Command::new(venv_python())
        .arg(workspace_root().join("tests/helpers/check_sr.py"))
        .args(&paths)
        .output()
        .expect("python");
    let reports: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", both(&out)));
    assert_eq!(reports.len(), files.len());
    for report in &reports {
        assert_eq!(
            report["sop_class"], "1.2.840.10008.5.1.4.1.1.88.33",
            "{report}"
        );
        assert_eq!(report["template"], "1500");
        assert_eq!(report["groups"], 1);
        let tracking = report["tracking_identifier"].as_str().unwrap_or_default();
        assert!(record_ids.iter().any(|id| id == tracking), "{report}");
        assert_eq!(
            report["algorithm"],
            serde_json::json!(["cxrfed-tiny-phantom-v1"])
        );
        assert_eq!(report["observers"], 1, "the device observer");
        let quals = report["qualitative"].as_object().expect("qualitative");
        assert!(quals.len() >= 20, "every categorical finding: {report}");
        let cpa = &quals["Costophrenic angles"];
        assert!(
            cpa[1] == "99CXRFED" || cpa[1] == "SCT",
            "coded in a scheme: {cpa}"
        );
        let ctr = &report["measurements"]["Cardiothoracic ratio"];
        assert_eq!(ctr[1], "{ratio}", "UCUM units: {report}");
        let ratio = ctr[0].as_f64().expect("a number");
        // The findings read back are the record's.
        let record = records
            .iter()
            .find(|r| r["record_id"] == tracking)
            .expect("the record");
        let findings = &record["findings"];
        let stored_ratio = findings["mediastinum"]["cardiothoracic_ratio"]["value"]
            .as_f64()
            .expect("ratio");
        assert!(
            (ratio - stored_ratio).abs() < 1e-5,
            "{ratio} vs {stored_ratio}"
        );
        let code_of = |value: &serde_json::Value| -> String {
            match value {
                serde_json::Value::Bool(true) => "373066001".into(),
                serde_json::Value::Bool(false) => "373067005".into(),
                v => match v.as_str().unwrap_or_default() {
                    "normal" => "17621005".into(),
                    "mild" => "255604002".into(),
                    "moderate" => "6736007".into(),
                    "severe" => "24484000".into(),
                    other => other.to_string(),
                },
            }
        };
        for (meaning, finding) in [
            ("Image quality", &findings["image_quality"]),
            (
                "Costophrenic angles",
                &findings["diaphragm"]["costophrenic_angle"],
            ),
            ("Rib fracture", &findings["thorax"]["rib_fracture"]),
            (
                "Cardiac silhouette",
                &findings["mediastinum"]["cardiac_contour"],
            ),
            (
                "Lung opacity severity",
                &findings["lungs"]["opacity_severity"],
            ),
        ] {
            assert_eq!(
                quals[meaning][0].as_str().unwrap_or_default(),
                code_of(&finding["value"]),
                "{meaning}: {report} vs {finding}"
            );
            let p = report["probabilities"][meaning]
                .as_f64()
                .expect("probability");
            let stored = finding["probability"].as_f64().expect("probability");
            assert!((p - stored).abs() < 1e-5, "{meaning}: {p} vs {stored}");
        }
        for uid in ["sop_instance", "study", "tracking_uid"] {
            assert!(
                report[uid]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with("2.25.")
            );
        }
        assert_eq!(report["patient_name"], "");
        assert_eq!(report["patient_birth_date"], "");
    }

    // dcmtk's SR parser reads them without an error; none carries an RG1 identifier or UID.
    for path in &paths {
        let out = dcmtk("dsrdump", &[path.as_str()]);
        assert!(out.status.success(), "dsrdump {path}: {}", both(&out));
        let stderr = text(&out.stderr);
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("E:")).collect();
        assert!(errors.is_empty(), "{path}: {errors:?}");
    }
    // dicom3tools' dciodvfy (the IOD and its modules) reports no error.
    for path in &paths {
        let out = dcmtk("dciodvfy", &[path.as_str()]);
        let report = both(&out);
        let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("Error")).collect();
        assert!(errors.is_empty(), "dciodvfy {path}: {errors:?}\n{report}");
    }
    let mut all = Vec::new();
    for path in &paths {
        all.extend(std::fs::read(path).expect("sr"));
    }
    for id in rg1_identifiers() {
        assert!(!contains(&all, &id), "an SR carries {id:?}");
    }

    // The same records as one FHIR R4 Bundle, validated by fhirclient's R4 models (strict):
    // a DiagnosticReport per record, its measurement group's members one Observation per
    // finding with the model's probability, every reference resolved inside the bundle.
    let fhir_dir = tempfile::tempdir().expect("tempdir");
    let bundle = fhir_dir.path().join("bundle.json");
    let bundle_path = bundle.to_str().expect("utf-8 path");
    let out = node.cli(&["export", "--format", "fhir", "--out", bundle_path]);
    assert!(out.status.success(), "fhir export: {}", text(&out.stderr));
    let out = Command::new(venv_python())
        .arg(workspace_root().join("tests/helpers/check_fhir.py"))
        .arg(&bundle)
        .output()
        .expect("python");
    let fhir: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", both(&out)));
    assert_eq!(fhir["type"], "collection");
    assert_eq!(fhir["counts"]["DiagnosticReport"], files.len(), "{fhir}");
    assert_eq!(fhir["counts"]["Device"], 1, "one model: {fhir}");
    for report in fhir["reports"].as_array().expect("reports") {
        assert_eq!(report["status"], "final");
        assert_eq!(report["performer"], "Device");
        let id = report["record_id"].as_str().unwrap_or_default();
        assert!(record_ids.iter().any(|r| r == id), "{report}");
        let findings = report["findings"].as_object().expect("findings");
        assert!(findings.len() >= 20, "{report}");
        assert_eq!(
            report["probabilities"].as_u64(),
            Some(findings.len() as u64)
        );
        let ctr = &findings["Cardiothoracic ratio"];
        assert_eq!(ctr[0], "http://unitsofmeasure.org");
        assert_eq!(ctr[1], "{ratio}");
    }

    // --send stores them in a research PACS: dcmtk's storescp.
    let pacs_dir = tempfile::tempdir().expect("tempdir");
    let pacs_port = free_port().to_string();
    let mut pacs = Command::new(dcmtk_bin("storescp"))
        .args(["-aet", "RESEARCH", "-od"])
        .arg(pacs_dir.path())
        .arg(&pacs_port)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("storescp");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", pacs_port.parse::<u16>().expect("port")))
        .is_err()
    {
        assert!(Instant::now() < deadline, "storescp did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let target = format!("RESEARCH@127.0.0.1:{pacs_port}");
    let out = node.cli(&[
        "export", "--format", "dicom-sr", "--out", sr_dir, "--send", &target,
    ]);
    let _ = pacs.kill();
    let _ = pacs.wait();
    assert!(out.status.success(), "--send: {}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(&format!("sent {} of {}", files.len(), files.len())),
        "{}",
        text(&out.stderr)
    );
    let received = listing(pacs_dir.path());
    assert_eq!(received.len(), files.len(), "{received:?}");
    for name in &first {
        let uid = name.trim_end_matches(".dcm");
        assert!(
            received.iter().any(|r| r.ends_with(uid)),
            "{uid} not in {received:?}"
        );
    }

    // A PACS that is not there: a clear error and a failing exit status.
    let out = node.cli(&[
        "export",
        "--format",
        "dicom-sr",
        "--out",
        sr_dir,
        "--send",
        "RESEARCH@127.0.0.1:1",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("could not connect"),
        "{}",
        text(&out.stderr)
    );
    // --send without dicom-sr is refused.
    let out = node.cli(&["export", "--format", "csv", "--send", &target]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--format dicom-sr"));
}

/// dcmtk's dcmqrscp as the hospital PACS: an index of `files` (dcmqridx), AE `PACS` on
/// `port`, which knows the node's AE `CXRFED` at `node_dicom_port` as a move destination.
fn start_pacs(
    dir: &Path,
    port: u16,
    node_dicom_port: u16,
    files: &[PathBuf],
) -> std::process::Child {
    let db = dir.join("db");
    std::fs::create_dir_all(&db).expect("db");
    let config = dir.join("dcmqrscp.cfg");
    std::fs::write(
        &config,
        format!(
            "NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n\n\
             HostTable BEGIN\ncxrfed = ({AE}, 127.0.0.1, {node_dicom_port})\nHostTable END\n\n\
             VendorTable BEGIN\nVendorTable END\n\n\
             AETable BEGIN\nPACS {} RW (200, 1024mb) ANY\nAETable END\n",
            db.display()
        ),
    )
    .expect("config");
    let mut args: Vec<String> = vec![db.display().to_string()];
    args.extend(files.iter().map(|f| f.display().to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = dcmtk("dcmqridx", &refs);
    assert!(out.status.success(), "dcmqridx: {}", both(&out));
    let child = Command::new(dcmtk_bin("dcmqrscp"))
        .arg("-c")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dcmqrscp");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "dcmqrscp did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

fn pull(node: &NodeProcess, pacs_port: u16, extra: &[&str]) -> Output {
    let pacs = format!("PACS@127.0.0.1:{pacs_port}");
    let profile = node.profile();
    let mut args = vec![
        "node",
        "pull",
        "--data-dir",
        node.data_dir_str(),
        "--profile",
        &profile,
        "--pacs",
        &pacs,
        "--rate",
        "50",
    ];
    args.extend_from_slice(extra);
    cxrfed(&args)
}

#[test]
fn node_pull_finds_and_moves_from_dcmqrscp_resumes_and_reruns_pull_nothing_new() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, dicom_port) = start(dir.path(), &["--dicom-allow", "PACS@127.0.0.1"]);
    // The PACS holds phantoms (uncompressed: dcmqrscp's move SCU proposes those).
    let work = tempfile::tempdir().expect("tempdir");
    let phantoms = work.path().join("phantoms");
    let out = cxrfed(&[
        "phantom",
        "--out",
        phantoms.to_str().expect("utf-8 path"),
        "--count",
        "8",
        "--seed",
        "31",
        "--max-size",
        "128",
        "--transfer-syntax",
        "explicit",
    ]);
    assert!(out.status.success(), "phantom: {}", text(&out.stderr));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&phantoms)
        .expect("phantoms")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "dcm"))
        .collect();
    files.sort();
    let dx = files
        .iter()
        .filter(|f| {
            let object = dicom_object::open_file(f).expect("phantom");
            object
                .element(dicom_dictionary_std::tags::MODALITY)
                .ok()
                .and_then(|e| e.to_str().ok())
                .is_some_and(|m| m.trim() == "DX")
        })
        .count();
    assert!(dx >= 2 && dx < files.len(), "{dx} DX of {}", files.len());
    let pacs_port = free_port();
    let mut pacs = start_pacs(work.path(), pacs_port, dicom_port, &files);

    // Two DX instances, then the rest of the DX ones (the first two are not moved again),
    // then a rerun that moves nothing.
    let out = pull(
        &node,
        pacs_port,
        &[
            "--query",
            "Modality=DX BodyPartExamined=CHEST",
            "--limit",
            "2",
        ],
    );
    assert!(
        out.status.success(),
        "pull: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("retrieved 2, pulled before 0, failed 0"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(record_count(&node), 2);
    let out = pull(
        &node,
        pacs_port,
        &["--query", "Modality=DX BodyPartExamined=CHEST"],
    );
    assert!(out.status.success(), "pull: {}", text(&out.stderr));
    let expected = format!(
        "{dx}/{dx} instances, retrieved {}, pulled before 2, failed 0",
        dx - 2
    );
    assert!(
        text(&out.stdout).contains(&expected),
        "{expected}: {}",
        text(&out.stdout)
    );
    assert_eq!(record_count(&node), dx);
    let out = pull(&node, pacs_port, &["--query", "Modality=DX"]);
    assert!(
        text(&out.stdout).contains(&format!("retrieved 0, pulled before {dx}")),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(record_count(&node), dx, "a rerun pulls nothing new");

    // Everything: the other modality's instances arrive, each once.
    let out = pull(&node, pacs_port, &[]);
    assert!(out.status.success(), "pull: {}", text(&out.stderr));
    assert_eq!(record_count(&node), files.len());
    let status = node_status(&node);
    assert!(status.contains("pull job"), "{status}");

    // Bad requests get a clear refusal; no UID of the PACS's instances is in the store or log.
    let out = pull(&node, pacs_port, &["--query", "PatientName=DOE"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("StudyDate, Modality and BodyPartExamined"),
        "{}",
        text(&out.stderr)
    );
    let _ = pacs.kill();
    let _ = pacs.wait();
    let out = pull(&node, pacs_port, &[]);
    assert!(!out.status.success(), "a PACS that is gone fails the job");
    let out = cxrfed(&["node", "stop", "--data-dir", node.data_dir_str()]);
    assert!(out.status.success());
    let mut node = node;
    node.wait_exit(Duration::from_secs(30)).expect("stopped");
    let stored = all_bytes(dir.path());
    for file in &files {
        let object = dicom_object::open_file(file).expect("phantom");
        for tag in [
            dicom_dictionary_std::tags::SOP_INSTANCE_UID,
            dicom_dictionary_std::tags::STUDY_INSTANCE_UID,
        ] {
            let uid = object.element(tag).expect("uid").to_str().expect("text");
            assert!(
                !contains(&stored, uid.trim_end_matches('\0')),
                "{uid} is stored"
            );
        }
    }
}

#[test]
fn node_pull_needs_the_receiver() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(dir.path(), &[]);
    let out = pull(&node, 1, &[]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("DICOM receiver"),
        "{}",
        text(&out.stderr)
    );
}
