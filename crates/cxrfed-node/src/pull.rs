//! Pulling studies from a PACS (`StartPull`, `cxrfed node pull`): study root C-FIND down to
//! the instances that match the query, then one C-MOVE per new instance to the node's own
//! DICOM receiver, which stores it through the same pipeline as every other input before it
//! answers the PACS. A background job in the ingest job table (`IngestJobs`, `node status`).
//!
//! * **Resumable.** An instance whose C-MOVE completed is marked in the store by the site's
//!   keyed reference to its SOP Instance UID (HMAC under the site secret: the UID itself is
//!   never stored or logged, and lives in memory only while the job runs). A rerun skips
//!   marked instances; a mark lost in a crash only makes the instance move again, and the
//!   pixel-hash de-duplication stores nothing twice.
//! * **Gentle.** One association, one C-MOVE at a time, at most `rate` instances per second
//!   (default 5), so a clinical PACS is not flooded.
//! * **Bounded.** At most `limit` instances (and never more than [`MAX_INSTANCES`]) per job,
//!   one pull job per PACS at a time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cxrfed_dicom::scu::{Peer, QueryRetrieve};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;

use crate::error::NodeError;
use crate::ingest::{FileOutcome, Job};
use crate::state::Node;

/// The most instances one job lists and retrieves.
pub const MAX_INSTANCES: u64 = 1_000_000;
const DEFAULT_RATE: f64 = 5.0;
const MAX_RATE: f64 = 1000.0;

/// The query keys `node pull --query` accepts, parsed from `Key=Value` words.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullQuery {
    pub study_date: String,
    pub modality: String,
    pub body_part: String,
}

impl PullQuery {
    pub fn parse(text: &str) -> Result<PullQuery, String> {
        let mut query = PullQuery::default();
        for word in text.split_whitespace() {
            let (key, value) = word
                .split_once('=')
                .ok_or_else(|| format!("query word {word:?}: expected Key=Value"))?;
            let slot = match key {
                "StudyDate" => {
                    let dates: Vec<&str> = value.split('-').collect();
                    let valid = dates.len() <= 2
                        && dates.iter().all(|d| {
                            d.is_empty() || (d.len() == 8 && d.bytes().all(|b| b.is_ascii_digit()))
                        })
                        && dates.iter().any(|d| !d.is_empty());
                    if !valid {
                        return Err(format!(
                            "StudyDate {value:?}: expected YYYYMMDD or a range YYYYMMDD-YYYYMMDD"
                        ));
                    }
                    &mut query.study_date
                }
                "Modality" => &mut query.modality,
                "BodyPartExamined" => &mut query.body_part,
                other => {
                    return Err(format!(
                        "query key {other:?}: the keys are StudyDate, Modality and BodyPartExamined"
                    ));
                }
            };
            if key != "StudyDate"
                && (value.is_empty()
                    || value.len() > 16
                    || !value.bytes().all(|b| {
                        b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_' || b == b'*'
                    }))
            {
                return Err(format!(
                    "{key} {value:?}: a code string of up to 16 upper-case letters, digits, _ or *"
                ));
            }
            *slot = value.to_string();
        }
        Ok(query)
    }

    /// Whether a returned value matches a query value (`*` matches anything; an attribute the
    /// PACS did not return is not held against the match — it applied the key itself or does
    /// not support it).
    fn admits(wanted: &str, returned: &str) -> bool {
        wanted.is_empty()
            || returned.is_empty()
            || wanted == "*"
            || match wanted.strip_suffix('*') {
                Some(prefix) => returned.to_ascii_uppercase().starts_with(prefix),
                None => returned.eq_ignore_ascii_case(wanted),
            }
    }
}

/// What `StartPull` asks for.
#[derive(Debug, Clone)]
pub struct PullRequest {
    pub pacs: Peer,
    pub query: PullQuery,
    pub limit: u64,
    pub rate: f64,
    pub calling_ae: String,
}

/// Starts a pull job.
pub fn start(state: Arc<Node>, request: PullRequest) -> Result<Arc<Job>, NodeError> {
    if state.config().dicom_listen.is_none() {
        return Err(NodeError::FailedPrecondition(
            "node pull needs the DICOM receiver (dicom_listen): the PACS sends the images there \
             (configure the node's AE title and address on the PACS, and the PACS's AE title in \
             dicom_allow)"
                .into(),
        ));
    }
    let pacs = format!("{}@{}", request.pacs.ae_title, request.pacs.address);
    if state
        .jobs()
        .all()
        .iter()
        .any(|j| j.is_running() && j.source == format!("pacs {pacs}"))
    {
        return Err(NodeError::InvalidRequest(format!(
            "a pull from {pacs} is already running"
        )));
    }
    let job = Arc::new(Job::pull(&pacs));
    state.jobs().add(job.clone());
    tracing::info!(
        job_id = job.id.as_str(),
        pacs = pacs.as_str(),
        "pull job started"
    );
    let running = job.clone();
    tokio::spawn(async move {
        let (state2, job2) = (state.clone(), running.clone());
        let outcome = tokio::task::spawn_blocking(move || run(&state2, &job2, &request))
            .await
            .unwrap_or_else(|e| Err(NodeError::Internal(format!("pull job: {e}"))));
        let label = match &outcome {
            Ok(()) => "done".to_string(),
            Err(e) => format!("failed: {e}"),
        };
        tracing::info!(
            job_id = running.id.as_str(),
            pacs = pacs.as_str(),
            outcome = label.as_str(),
            instances = running.files_done(),
            "pull job finished"
        );
        running.finish(label);
    });
    Ok(job)
}

/// One instance to retrieve (original UIDs: in memory only, for the C-MOVE).
struct Instance {
    study: String,
    series: String,
    sop: String,
}

fn pacs_error(e: String) -> NodeError {
    NodeError::FailedPrecondition(format!("PACS: {e}"))
}

fn run(state: &Node, job: &Job, request: &PullRequest) -> Result<(), NodeError> {
    let mut qr = QueryRetrieve::connect(&request.pacs, &request.calling_ae).map_err(pacs_error)?;
    let result = pull(state, job, request, &mut qr);
    qr.release();
    result
}

fn pull(
    state: &Node,
    job: &Job,
    request: &PullRequest,
    qr: &mut QueryRetrieve,
) -> Result<(), NodeError> {
    let query = &request.query;
    let limit = match request.limit {
        0 => MAX_INSTANCES,
        n => n.min(MAX_INSTANCES),
    };
    let level = |l: &'static str| (tags::QUERY_RETRIEVE_LEVEL, VR::CS, l);
    let studies = qr
        .find(
            &[
                level("STUDY"),
                (tags::STUDY_INSTANCE_UID, VR::UI, ""),
                (tags::STUDY_DATE, VR::DA, query.study_date.as_str()),
            ],
            &[tags::STUDY_INSTANCE_UID],
        )
        .map_err(pacs_error)?;
    let mut instances: Vec<Instance> = Vec::new();
    'listing: for study in studies
        .iter()
        .filter_map(|s| s.first())
        .filter(|s| !s.is_empty())
    {
        let series = qr
            .find(
                &[
                    level("SERIES"),
                    (tags::STUDY_INSTANCE_UID, VR::UI, study.as_str()),
                    (tags::SERIES_INSTANCE_UID, VR::UI, ""),
                    (tags::MODALITY, VR::CS, query.modality.as_str()),
                    (tags::BODY_PART_EXAMINED, VR::CS, query.body_part.as_str()),
                ],
                &[
                    tags::SERIES_INSTANCE_UID,
                    tags::MODALITY,
                    tags::BODY_PART_EXAMINED,
                ],
            )
            .map_err(pacs_error)?;
        for found in series {
            let [uid, modality, body_part] = <[String; 3]>::try_from(found)
                .map_err(|_| pacs_error("a series without its keys".into()))?;
            if uid.is_empty()
                || !PullQuery::admits(&query.modality, &modality)
                || !PullQuery::admits(&query.body_part, &body_part)
            {
                continue;
            }
            let images = qr
                .find(
                    &[
                        level("IMAGE"),
                        (tags::STUDY_INSTANCE_UID, VR::UI, study.as_str()),
                        (tags::SERIES_INSTANCE_UID, VR::UI, uid.as_str()),
                        (tags::SOP_INSTANCE_UID, VR::UI, ""),
                    ],
                    &[tags::SOP_INSTANCE_UID],
                )
                .map_err(pacs_error)?;
            for sop in images.into_iter().filter_map(|i| i.into_iter().next()) {
                if sop.is_empty() {
                    continue;
                }
                instances.push(Instance {
                    study: study.clone(),
                    series: uid.clone(),
                    sop,
                });
                if instances.len() as u64 >= limit {
                    break 'listing;
                }
            }
        }
    }
    job.set_total(instances.len() as u64);

    let rate = if request.rate > 0.0 {
        request.rate.min(MAX_RATE)
    } else {
        DEFAULT_RATE
    };
    let interval = Duration::from_secs_f64(1.0 / rate);
    let destination = state.config().dicom_ae.clone();
    let mut next = Instant::now();
    for instance in instances {
        if state.shutdown().is_cancelled() {
            return Err(NodeError::ShuttingDown);
        }
        let reference = state
            .pipeline()
            .keyed_reference("pacs-instance", &instance.sop);
        if state.store().is_pulled(&reference)? {
            job.record(FileOutcome::AlreadyPresent);
            continue;
        }
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        next = Instant::now() + interval;
        let keys: [(Tag, VR, &str); 4] = [
            level("IMAGE"),
            (tags::STUDY_INSTANCE_UID, VR::UI, instance.study.as_str()),
            (tags::SERIES_INSTANCE_UID, VR::UI, instance.series.as_str()),
            (tags::SOP_INSTANCE_UID, VR::UI, instance.sop.as_str()),
        ];
        let moved = qr.move_to(&keys, &destination).map_err(pacs_error)?;
        let ok = cxrfed_dicom::dimse::status::is_stored(moved.status)
            && moved.completed >= 1
            && moved.failed == 0;
        if ok {
            state.store().mark_pulled(&reference)?;
            job.record(FileOutcome::Ingested);
        } else {
            tracing::warn!(
                job_id = job.id.as_str(),
                status = format!("{:04X}", moved.status),
                completed = moved.completed,
                failed = moved.failed,
                comment = moved.comment.as_str(),
                "a C-MOVE did not complete"
            );
            job.record(FileOutcome::Rejected(format!(
                "move_failed_{:04x}",
                moved.status
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_parse_and_bad_ones_name_the_problem() {
        let q = PullQuery::parse("Modality=CR StudyDate=20240101-20241231 BodyPartExamined=CHEST")
            .expect("query");
        assert_eq!(q.modality, "CR");
        assert_eq!(q.study_date, "20240101-20241231");
        assert_eq!(q.body_part, "CHEST");
        assert_eq!(PullQuery::parse("").expect("empty"), PullQuery::default());
        assert!(PullQuery::parse("StudyDate=-20241231").is_ok());
        let err = PullQuery::parse("PatientName=DOE").expect_err("not a key");
        assert!(
            err.contains("StudyDate, Modality and BodyPartExamined"),
            "{err}"
        );
        assert!(PullQuery::parse("StudyDate=2024").is_err());
        assert!(PullQuery::parse("StudyDate=-").is_err());
        assert!(PullQuery::parse("Modality=cr\\x").is_err());
        assert!(PullQuery::parse("Modality").is_err());
    }

    #[test]
    fn matching_is_lenient_only_where_the_pacs_said_nothing() {
        assert!(PullQuery::admits("CR", "cr"));
        assert!(PullQuery::admits("CR", ""));
        assert!(!PullQuery::admits("CR", "CT"));
        assert!(PullQuery::admits("CH*", "CHEST"));
        assert!(PullQuery::admits("", "ANY"));
    }
}
