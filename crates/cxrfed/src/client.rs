//! Client commands: `extract` and `records`. They talk to a running node over gRPC only —
//! sled allows one process per database, so nothing here opens a store.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use cxrfed_proto::v1 as pb;
use cxrfed_proto::v1::node_service_client::NodeServiceClient;
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;

/// Upload chunk size: well under the server's 4 MiB message limit.
const CHUNK_BYTES: usize = 1024 * 1024;
const DEFAULT_NODE: &str = "https://127.0.0.1:50051";

/// How a client authenticates: the study CA and the caller's certificate, given directly or
/// through a profile file (`certs issue` writes one); flags win over the profile.
#[derive(Debug, Clone, Default, Args)]
pub struct Credentials {
    /// Profile file naming ca, cert and key (and optionally the node URL).
    #[arg(long, env = "CXRFED_PROFILE")]
    pub profile: Option<PathBuf>,
    /// The study CA certificate (PEM).
    #[arg(long, env = "CXRFED_CA")]
    pub ca: Option<PathBuf>,
    /// Your certificate (PEM).
    #[arg(long, env = "CXRFED_CERT")]
    pub cert: Option<PathBuf>,
    /// Your private key (PEM, mode 0600).
    #[arg(long, env = "CXRFED_KEY")]
    pub key: Option<PathBuf>,
}

impl Credentials {
    fn profile(&self) -> anyhow::Result<Option<cxrfed_auth::client::Profile>> {
        self.profile
            .as_deref()
            .map(cxrfed_auth::client::Profile::load)
            .transpose()
            .map_err(Into::into)
    }

    /// A mutual-TLS channel to `url` with these credentials.
    pub async fn channel(&self, url: &str) -> anyhow::Result<Channel> {
        let profile = self.profile()?;
        let credentials = cxrfed_auth::client::credentials(
            profile.as_ref(),
            self.ca.clone(),
            self.cert.clone(),
            self.key.clone(),
        );
        // This channel is the coordinator's: its certificate must say so.
        cxrfed_auth::client::connect_to(url, credentials.as_ref(), cxrfed_auth::Role::Coordinator)
            .await
            .with_context(|| format!("cannot reach {url}; is it running?"))
    }

    /// The key and certificate that sign requests (the researcher's own).
    pub fn signer(&self) -> anyhow::Result<cxrfed_auth::signing::Signer> {
        let profile = self.profile()?;
        let cert = self
            .cert
            .clone()
            .or_else(|| profile.as_ref().and_then(|p| p.cert.clone()));
        let key = self
            .key
            .clone()
            .or_else(|| profile.as_ref().and_then(|p| p.key.clone()));
        let (Some(cert), Some(key)) = (cert, key) else {
            anyhow::bail!(
                "a federated query is signed with your certificate: give --profile or --cert/--key"
            );
        };
        Ok(cxrfed_auth::signing::Signer::load(&cert, &key)?)
    }

    /// The node URL (flag, then profile, then the default) and a connected client.
    pub async fn connect_node(
        &self,
        node: Option<&str>,
    ) -> anyhow::Result<NodeServiceClient<Channel>> {
        let profile = self.profile()?;
        let url = node
            .map(str::to_string)
            .or_else(|| profile.as_ref().and_then(|p| p.node.clone()))
            .unwrap_or_else(|| DEFAULT_NODE.to_string());
        let credentials = cxrfed_auth::client::credentials(
            profile.as_ref(),
            self.ca.clone(),
            self.cert.clone(),
            self.key.clone(),
        );
        // A node's certificate must say `node` (not a coordinator's, or another role's).
        let channel =
            cxrfed_auth::client::connect_to(&url, credentials.as_ref(), cxrfed_auth::Role::Node)
                .await
                .with_context(|| {
                    format!("cannot reach the node at {url}; is it running? (`cxrfed node status`)")
                })?;
        if url.starts_with("http://") {
            // Plaintext against a TLS node fails below gRPC with an unhelpful h2 error: probe
            // with a health check first and say what is wrong.
            let probe = tonic_health::pb::health_client::HealthClient::new(channel.clone())
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await;
            if let Err(status) = probe
                && !matches!(
                    status.code(),
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                )
            {
                anyhow::bail!(
                    "the node at {url} does not answer plaintext gRPC ({}): it speaks mutual \
                         TLS unless started with --insecure-dev; use https:// with --profile or \
                         --ca/--cert/--key",
                    status.message()
                );
            }
        }
        Ok(NodeServiceClient::new(channel)
            .max_decoding_message_size(8 * 1024 * 1024)
            .max_encoding_message_size(8 * 1024 * 1024))
    }
}

/// A gRPC error as one line: the message and the status code.
pub fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", status.message(), status.code())
}

#[derive(Debug, Args)]
pub struct ExtractArgs {
    /// Node URL [default: the profile's node, else https://127.0.0.1:50051].
    #[arg(long, env = "CXRFED_NODE")]
    node: Option<String>,
    #[command(flatten)]
    credentials: Credentials,
    /// Re-extract images that are already stored (the new record replaces the old one).
    #[arg(long)]
    force: bool,
    /// Image files (DICOM, JPEG or PNG; recognised by content).
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RecordsArgs {
    /// Node URL [default: the profile's node, else https://127.0.0.1:50051].
    #[arg(long, env = "CXRFED_NODE")]
    node: Option<String>,
    #[command(flatten)]
    credentials: Credentials,
    /// Maximum number of records to print.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Only this view: PA, AP, LL or unknown.
    #[arg(long)]
    view: Option<String>,
    /// Only this modality, e.g. CR or DX.
    #[arg(long)]
    modality: Option<String>,
    /// Only acquisitions from this month on (YYYY-MM).
    #[arg(long)]
    from: Option<String>,
    /// Only acquisitions up to this month (YYYY-MM).
    #[arg(long)]
    to: Option<String>,
}

pub fn run<T>(future: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    cxrfed_server::logging::init_client();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(future)
}

pub async fn node_status(
    url: &str,
    credentials: &Credentials,
) -> anyhow::Result<pb::StatusResponse> {
    let mut client = credentials.connect_node(Some(url)).await?;
    Ok(client
        .status(pb::StatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner())
}

/// A refusal by the node: its status code, the stable kind from the `x-cxrfed-error`
/// trailer, and the message.
#[derive(Debug)]
pub struct Refused {
    pub code: tonic::Code,
    pub kind: String,
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({:?})", self.message, self.code)
    }
}

impl std::error::Error for Refused {}

impl From<tonic::Status> for Refused {
    fn from(status: tonic::Status) -> Refused {
        Refused {
            code: status.code(),
            kind: status
                .metadata()
                .get("x-cxrfed-error")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
            message: status.message().to_string(),
        }
    }
}

/// Streams one file to the node in chunks, reading it as it goes (bounded memory).
pub async fn extract_file(
    client: &mut NodeServiceClient<Channel>,
    path: &Path,
    force: bool,
) -> anyhow::Result<pb::ExtractResponse> {
    let mut file = tokio::fs::File::open(path).await.context("cannot open")?;
    let size = file.metadata().await.context("cannot stat")?.len();
    let filename = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::ExtractRequest>(4);
    let reader = tokio::spawn(async move {
        let mut header = Some(pb::ExtractHeader {
            filename,
            force,
            size_hint: size,
        });
        loop {
            let mut chunk = vec![0u8; CHUNK_BYTES];
            let n = file.read(&mut chunk).await?;
            chunk.truncate(n);
            if n == 0 && header.is_none() {
                break;
            }
            let message = pb::ExtractRequest {
                header: header.take(),
                chunk: chunk.into(),
            };
            if tx.send(message).await.is_err() || n == 0 {
                break;
            }
        }
        Ok::<(), std::io::Error>(())
    });
    let response = client
        .extract(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    reader
        .await
        .context("reader task failed")?
        .context("cannot read")?;
    let response = response.map_err(Refused::from)?;
    Ok(response.into_inner())
}

fn print_record(record: pb::Record) -> anyhow::Result<()> {
    let record =
        cxrfed_schema::Record::try_from(record).context("the node sent an invalid record")?;
    println!("{}", serde_json::to_string(&record)?);
    Ok(())
}

pub async fn extract(args: ExtractArgs) -> anyhow::Result<ExitCode> {
    let mut client = args.credentials.connect_node(args.node.as_deref()).await?;
    let mut failures = 0usize;
    for path in &args.files {
        match extract_file(&mut client, path, args.force).await {
            Ok(response) => {
                let Some(record) = response.record else {
                    failures += 1;
                    eprintln!("{}: the node answered without a record", path.display());
                    continue;
                };
                eprintln!(
                    "{}: {} record {}",
                    path.display(),
                    if response.created {
                        "created"
                    } else {
                        "already stored as"
                    },
                    record.record_id
                );
                print_record(record)?;
            }
            Err(e) => {
                failures += 1;
                eprintln!("{}: error: {e:#}", path.display());
            }
        }
    }
    if failures > 0 {
        eprintln!("{failures} of {} files failed", args.files.len());
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn records(args: RecordsArgs) -> anyhow::Result<ExitCode> {
    let view = match args.view.as_deref() {
        None => pb::View::Unspecified,
        Some(text) => cxrfed_schema::View::parse(text)
            .map(pb::View::from)
            .with_context(|| format!("unknown view {text:?} (PA, AP, LL or unknown)"))?,
    };
    let mut client = args.credentials.connect_node(args.node.as_deref()).await?;
    let mut printed = 0usize;
    let mut page_token = String::new();
    while printed < args.limit {
        let request = pb::ListRecordsRequest {
            page_size: (args.limit - printed).min(1000) as u32,
            page_token: page_token.clone(),
            view: view as i32,
            modality: args.modality.clone().unwrap_or_default(),
            month_from: args.from.clone().unwrap_or_default(),
            month_to: args.to.clone().unwrap_or_default(),
        };
        let mut stream = client
            .list_records(request)
            .await
            .map_err(status_error)?
            .into_inner();
        page_token.clear();
        while let Some(item) = stream.message().await? {
            match item.item {
                Some(pb::list_records_response::Item::Record(record)) => {
                    print_record(record)?;
                    printed += 1;
                }
                Some(pb::list_records_response::Item::PageEnd(end)) => {
                    page_token = end.next_page_token
                }
                None => {}
            }
        }
        if page_token.is_empty() {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub struct AskArgs {
    /// The record to ask about.
    record_id: String,
    /// The question, in English or Chinese, e.g. "Is the left costophrenic angle blunted?".
    question: String,
    /// Node URL [default: the profile's node, else https://127.0.0.1:50051].
    #[arg(long, env = "CXRFED_NODE")]
    node: Option<String>,
    #[command(flatten)]
    credentials: Credentials,
    /// Print the whole response as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn ask(args: AskArgs) -> anyhow::Result<ExitCode> {
    let mut client = args.credentials.connect_node(args.node.as_deref()).await?;
    let response = client
        .ask(pb::AskRequest {
            record_id: args.record_id.clone(),
            question: args.question.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if args.json {
        let yes_no = match response.yes_no() {
            pb::YesNo::Yes => "yes",
            pb::YesNo::No => "no",
            pb::YesNo::Unknown => "unknown",
            pb::YesNo::Unspecified => "",
        };
        let doc = serde_json::json!({
            "understood": response.understood,
            "field": response.field,
            "matched_phrase": response.matched_phrase,
            "value": response.value,
            "probability": response.probability,
            "yes_values": response.yes_values,
            "yes_no": yes_no,
            "answer": response.answer,
            "suggestions": response.suggestions.iter().map(|s| serde_json::json!({"field": s.field, "phrase": s.phrase})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string(&doc)?);
    } else {
        println!("{}", response.answer);
    }
    Ok(if response.understood {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}
