//! The question lexicon: maps a natural-language question (English or Chinese) to a record
//! field, and for yes/no questions to the values that mean "yes". Data, not code: the bundled
//! lexicon is `data/lexicon.toml`, and a node can load an edited copy.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::flat;

/// The bundled lexicon's text.
pub const BUNDLED: &str = include_str!("../../../data/lexicon.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileField {
    phrases: Vec<String>,
    #[serde(default)]
    yes: Vec<String>,
    #[serde(default)]
    qualifiers: Vec<Qualifier>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Qualifier {
    pub phrases: Vec<String>,
    pub yes: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    fields: BTreeMap<String, FileField>,
}

#[derive(Debug, Clone)]
struct Entry {
    field: String,
    phrases: Vec<String>,
    yes: Vec<String>,
    qualifiers: Vec<Qualifier>,
}

/// A loaded, validated lexicon.
#[derive(Debug, Clone)]
pub struct Lexicon {
    entries: Vec<Entry>,
}

/// What a question was understood as.
#[derive(Debug, Clone, PartialEq)]
pub enum Interpretation {
    Field {
        field: String,
        /// The lexicon phrase that matched.
        phrase: String,
        /// For a yes/no question: the values that mean "yes" (empty: not a yes/no question).
        yes: Vec<String>,
    },
    /// Nothing matched: the closest fields, best first, with a phrase each.
    Unknown { suggestions: Vec<(String, String)> },
}

#[derive(Debug, thiserror::Error)]
#[error("lexicon: {0}")]
pub struct LexiconError(String);

fn normalize(text: &str) -> String {
    let mapped: String = text
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '-' {
                c.to_lowercase().next().unwrap_or(c)
            } else {
                ' '
            }
        })
        .collect();
    format!(
        " {} ",
        mapped.split_whitespace().collect::<Vec<_>>().join(" ")
    )
}

/// Whether `phrase` (normalized, without padding) occurs in `question` (normalized, padded):
/// whole words for alphabetic phrases, anywhere for CJK ones.
fn occurs(question: &str, phrase: &str) -> bool {
    if phrase.is_empty() {
        return false;
    }
    if phrase.is_ascii() {
        question.contains(&format!(" {phrase} "))
    } else {
        question.contains(phrase)
    }
}

fn bigrams(text: &str) -> Vec<(char, char)> {
    let chars: Vec<char> = text.chars().filter(|c| !c.is_whitespace()).collect();
    chars.windows(2).map(|w| (w[0], w[1])).collect()
}

/// Dice coefficient over character bigrams.
fn similarity(a: &str, b: &str) -> f64 {
    let (x, mut y) = (bigrams(a), bigrams(b));
    if x.is_empty() || y.is_empty() {
        return 0.0;
    }
    let total = x.len() + y.len();
    let mut shared = 0;
    for g in &x {
        if let Some(i) = y.iter().position(|h| h == g) {
            y.swap_remove(i);
            shared += 1;
        }
    }
    2.0 * shared as f64 / total as f64
}

impl Lexicon {
    pub fn bundled() -> Result<Lexicon, LexiconError> {
        Lexicon::parse(BUNDLED)
    }

    /// Parses and validates a lexicon: every field exists, every `yes` value is one of its
    /// field's categories.
    pub fn parse(text: &str) -> Result<Lexicon, LexiconError> {
        let file: File = toml::from_str(text).map_err(|e| LexiconError(e.to_string()))?;
        let mut entries = Vec::new();
        for (name, f) in file.fields {
            let field = flat::field(&name)
                .ok_or_else(|| LexiconError(format!("unknown field {name:?}")))?;
            let categories = field.kind.categories();
            for value in f
                .yes
                .iter()
                .chain(f.qualifiers.iter().flat_map(|q| q.yes.iter()))
            {
                if !categories.is_some_and(|c| c.contains(&value.as_str())) {
                    return Err(LexiconError(format!(
                        "{value:?} is not a value of {name} ({:?})",
                        categories.unwrap_or(&[])
                    )));
                }
            }
            let norm = |p: &String| normalize(p).trim().to_string();
            entries.push(Entry {
                field: name,
                phrases: f
                    .phrases
                    .iter()
                    .map(norm)
                    .filter(|p| !p.is_empty())
                    .collect(),
                yes: f.yes,
                qualifiers: f
                    .qualifiers
                    .into_iter()
                    .map(|q| Qualifier {
                        phrases: q.phrases.iter().map(norm).collect(),
                        yes: q.yes,
                    })
                    .collect(),
            });
        }
        Ok(Lexicon { entries })
    }

    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.field.as_str())
    }

    /// Maps a question to a field: the longest lexicon phrase found in it wins.
    pub fn interpret(&self, question: &str) -> Interpretation {
        let q = normalize(question);
        let best = self
            .entries
            .iter()
            .flat_map(|e| e.phrases.iter().map(move |p| (e, p)))
            .filter(|(_, p)| occurs(&q, p))
            .max_by_key(|(_, p)| p.chars().count());
        match best {
            Some((entry, phrase)) => {
                let qualifier = entry
                    .qualifiers
                    .iter()
                    .flat_map(|qual| qual.phrases.iter().map(move |p| (qual, p)))
                    .filter(|(_, p)| occurs(&q, p))
                    .max_by_key(|(_, p)| p.chars().count());
                Interpretation::Field {
                    field: entry.field.clone(),
                    phrase: phrase.clone(),
                    yes: qualifier.map_or_else(|| entry.yes.clone(), |(qual, _)| qual.yes.clone()),
                }
            }
            None => {
                let mut scored: Vec<(f64, &str, &str)> = self
                    .entries
                    .iter()
                    .filter_map(|e| {
                        e.phrases
                            .iter()
                            .map(|p| (similarity(&q, p), e.field.as_str(), p.as_str()))
                            .max_by(|a, b| a.0.total_cmp(&b.0))
                    })
                    .collect();
                scored.sort_by(|a, b| b.0.total_cmp(&a.0));
                Interpretation::Unknown {
                    suggestions: scored
                        .into_iter()
                        .take(3)
                        .map(|(_, f, p)| (f.to_string(), p.to_string()))
                        .collect(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(lexicon: &Lexicon, q: &str) -> (String, Vec<String>) {
        match lexicon.interpret(q) {
            Interpretation::Field { field, yes, .. } => (field, yes),
            other => panic!("{q:?} not understood: {other:?}"),
        }
    }

    #[test]
    fn the_bundled_lexicon_loads_and_maps_english_and_chinese() {
        let lexicon = Lexicon::bundled().expect("bundled lexicon");
        let (f, yes) = field_of(&lexicon, "Is the left costophrenic angle blunted?");
        assert_eq!(f, "costophrenic_angle");
        assert_eq!(yes, ["blunted_left", "blunted_both"]);
        let (f, yes) = field_of(&lexicon, "肺野透亮度是否普遍增高?");
        assert_eq!(
            (f.as_str(), yes.as_slice()),
            ("hyperlucency", &["true".to_string()][..])
        );
        let (f, yes) = field_of(&lexicon, "外周肺血管纹理是否明显变细?");
        assert_eq!(f, "vascular_pattern");
        assert_eq!(yes, ["decreased"]);
        assert_eq!(
            field_of(&lexicon, "Is there cardiomegaly?").0,
            "cardiac_contour"
        );
        assert_eq!(
            field_of(&lexicon, "What is the cardiothoracic ratio?").0,
            "cardiothoracic_ratio"
        );
        assert_eq!(
            field_of(&lexicon, "右侧肋膈角是否变钝？").1,
            ["blunted_right", "blunted_both"]
        );
        assert_eq!(field_of(&lexicon, "Any rib fracture?").0, "rib_fracture");
        // Whole words: "describe" does not contain the word "rib".
        assert!(matches!(
            lexicon.interpret("Please describe the weather"),
            Interpretation::Unknown { .. }
        ));
    }

    #[test]
    fn unknown_questions_get_suggestions() {
        let lexicon = Lexicon::bundled().expect("bundled lexicon");
        let Interpretation::Unknown { suggestions } =
            lexicon.interpret("Is the costophrenc angel ok?")
        else {
            panic!("should not match")
        };
        assert_eq!(suggestions.len(), 3);
        assert_eq!(suggestions[0].0, "costophrenic_angle");
    }

    #[test]
    fn a_lexicon_naming_unknown_fields_or_values_is_refused() {
        assert!(Lexicon::parse("[fields.nonsense]\nphrases = [\"x\"]\n").is_err());
        assert!(
            Lexicon::parse("[fields.hyperlucency]\nphrases = [\"x\"]\nyes = [\"maybe\"]\n")
                .is_err()
        );
    }
}
