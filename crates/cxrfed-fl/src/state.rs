//! The state machines of a federated job, as stored in the coordinator's round log and shown
//! to users. Serialised in lowercase (`"running"`, `"completed"`, ...), as the round log has
//! always stored them.
//!
//! - A job is `running` until it is `completed`, `failed` or `cancelled` (all final).
//! - A round attempt is `running`, then `completed` or, below `min_sites`, `retried` (another
//!   attempt follows) or `failed` (the last attempt); an attempt a coordinator crash cut short
//!   is `interrupted` and runs again. The closing evaluation of the final model is an
//!   `evaluation` round.
//! - A site in an attempt is `running` until it has `reported`, `failed` (its report or update
//!   was refused, with the reason) or was `dropped` at the deadline.

use serde::{Deserialize, Serialize};

macro_rules! lowercase_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(
            Debug,
            Clone,
            Copy,
            PartialEq,
            Eq,
            Hash,
            Default,
            Serialize,
            Deserialize,
            strum::Display,
            strum::EnumString,
            strum::IntoStaticStr,
            strum::VariantArray,
        )]
        #[serde(rename_all = "lowercase")]
        #[strum(serialize_all = "lowercase")]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                self.into()
            }
        }
    };
}

lowercase_enum! {
    /// A job's state.
    JobState {
        #[default]
        Running,
        Completed,
        Failed,
        Cancelled,
    }
}

lowercase_enum! {
    /// One attempt of a round.
    RoundState {
        #[default]
        Running,
        Evaluation,
        Completed,
        Retried,
        Failed,
        Interrupted,
    }
}

lowercase_enum! {
    /// One site in one round attempt.
    SiteStatus {
        #[default]
        Running,
        Reported,
        Failed,
        Dropped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strum::VariantArray;

    #[test]
    fn states_keep_the_round_logs_spelling() {
        assert_eq!(
            serde_json::to_string(&RoundState::Interrupted).expect("json"),
            "\"interrupted\""
        );
        assert_eq!(
            serde_json::from_str::<JobState>("\"cancelled\"").expect("json"),
            JobState::Cancelled
        );
        for s in SiteStatus::VARIANTS {
            assert_eq!(s.as_str().parse::<SiteStatus>().expect("parse"), *s);
        }
    }
}
