//! Enums on the wire, and their words for people: `JobState::Completed` is "completed" in
//! tables, logs and the Python SDK's frames, the enum value name without its prefix. The
//! federated-learning states map one to one onto their `cxrfed_fl` counterparts.

use crate::v1 as pb;

/// The lowercase word of a wire enum value (`SITE_QUERY_STATUS_NOT_CONNECTED` ->
/// `not_connected`).
pub trait Label {
    fn label(&self) -> String;
}

macro_rules! label {
    ($($ty:ty => $prefix:literal),+ $(,)?) => {
        $(impl Label for $ty {
            fn label(&self) -> String {
                let name = self.as_str_name();
                name.strip_prefix($prefix).unwrap_or(name).to_ascii_lowercase()
            }
        })+
    };
}

label! {
    pb::JobState => "JOB_STATE_",
    pb::RoundState => "ROUND_STATE_",
    pb::SiteRoundStatus => "SITE_ROUND_STATUS_",
    pb::SiteQueryStatus => "SITE_QUERY_STATUS_",
    pb::TaskErrorCode => "TASK_ERROR_CODE_",
    pb::Algorithm => "ALGORITHM_",
}

/// Maps each pair of variants both ways; an UNSPECIFIED wire value has no domain value.
macro_rules! one_to_one {
    ($domain:ty, $wire:ty, $unspecified:path, { $($d:path => $w:path),+ $(,)? }) => {
        impl From<$domain> for $wire {
            fn from(v: $domain) -> Self {
                match v { $($d => $w),+ }
            }
        }

        impl TryFrom<$wire> for $domain {
            type Error = crate::ConversionError;
            fn try_from(v: $wire) -> Result<Self, Self::Error> {
                match v {
                    $($w => Ok($d),)+
                    $unspecified => Err(crate::ConversionError {
                        field: stringify!($wire),
                        reason: "unspecified".into(),
                    }),
                }
            }
        }
    };
}

one_to_one!(cxrfed_fl::JobState, pb::JobState, pb::JobState::Unspecified, {
    cxrfed_fl::JobState::Running => pb::JobState::Running,
    cxrfed_fl::JobState::Completed => pb::JobState::Completed,
    cxrfed_fl::JobState::Failed => pb::JobState::Failed,
    cxrfed_fl::JobState::Cancelled => pb::JobState::Cancelled,
});

one_to_one!(cxrfed_fl::RoundState, pb::RoundState, pb::RoundState::Unspecified, {
    cxrfed_fl::RoundState::Running => pb::RoundState::Running,
    cxrfed_fl::RoundState::Evaluation => pb::RoundState::Evaluation,
    cxrfed_fl::RoundState::Completed => pb::RoundState::Completed,
    cxrfed_fl::RoundState::Retried => pb::RoundState::Retried,
    cxrfed_fl::RoundState::Failed => pb::RoundState::Failed,
    cxrfed_fl::RoundState::Interrupted => pb::RoundState::Interrupted,
});

one_to_one!(cxrfed_fl::SiteStatus, pb::SiteRoundStatus, pb::SiteRoundStatus::Unspecified, {
    cxrfed_fl::SiteStatus::Running => pb::SiteRoundStatus::Running,
    cxrfed_fl::SiteStatus::Reported => pb::SiteRoundStatus::Reported,
    cxrfed_fl::SiteStatus::Failed => pb::SiteRoundStatus::Failed,
    cxrfed_fl::SiteStatus::Dropped => pb::SiteRoundStatus::Dropped,
});

one_to_one!(cxrfed_fl::Algorithm, pb::Algorithm, pb::Algorithm::Unspecified, {
    cxrfed_fl::Algorithm::FedAvg => pb::Algorithm::Fedavg,
    cxrfed_fl::Algorithm::FedProx => pb::Algorithm::Fedprox,
    cxrfed_fl::Algorithm::FedAdam => pb::Algorithm::Fedadam,
});

#[cfg(test)]
mod tests {
    use super::*;
    use strum::VariantArray;

    #[test]
    fn labels_are_the_domain_words() {
        assert_eq!(pb::SiteQueryStatus::NotConnected.label(), "not_connected");
        assert_eq!(
            pb::TaskErrorCode::BudgetExhausted.label(),
            "budget_exhausted"
        );
        for state in cxrfed_fl::RoundState::VARIANTS {
            let wire = pb::RoundState::from(*state);
            assert_eq!(wire.label(), state.as_str());
            assert_eq!(cxrfed_fl::RoundState::try_from(wire).expect("back"), *state);
        }
        for state in cxrfed_fl::JobState::VARIANTS {
            assert_eq!(pb::JobState::from(*state).label(), state.as_str());
        }
        for status in cxrfed_fl::SiteStatus::VARIANTS {
            assert_eq!(pb::SiteRoundStatus::from(*status).label(), status.as_str());
        }
        assert_eq!(
            pb::Algorithm::from(cxrfed_fl::Algorithm::FedProx).label(),
            "fedprox"
        );
        assert!(cxrfed_fl::JobState::try_from(pb::JobState::Unspecified).is_err());
    }
}
