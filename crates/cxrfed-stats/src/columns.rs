//! The compact columnar form a node keeps of its records for aggregation: one dictionary-coded
//! `u16` column per categorical field, one `f32` column per numeric field, the patient
//! pseudonym (interned, for per-patient contribution bounding) and the image hash (the row key:
//! one row per stored image, so a forced re-extraction replaces its row).
//!
//! About 60 bytes per record; a million records aggregate in milliseconds without decoding a
//! single stored record.

use std::collections::HashMap;

use cxrfed_schema::Record;
use cxrfed_schema::flat::{Cell, FIELDS, FieldKind, FlatField};

/// Value dictionary of a coded column: code 0 is "missing", code i+1 is `names[i]`.
#[derive(Debug, Clone, Default)]
pub struct Dict {
    names: Vec<String>,
    index: HashMap<String, u16>,
    /// Fixed (public schema categories) or growing (months, modalities).
    fixed: bool,
}

impl Dict {
    fn fixed(values: &[&str]) -> Dict {
        let mut dict = Dict::default();
        for v in values {
            dict.insert(v);
        }
        dict.fixed = true;
        dict
    }

    fn insert(&mut self, name: &str) -> u16 {
        if let Some(&code) = self.index.get(name) {
            return code;
        }
        if self.fixed || self.names.len() >= usize::from(u16::MAX) - 1 {
            return 0;
        }
        self.names.push(name.to_string());
        let code = self.names.len() as u16;
        self.index.insert(name.to_string(), code);
        code
    }

    pub fn code(&self, name: &str) -> Option<u16> {
        self.index.get(name).copied()
    }

    /// The name of `code` (None for 0, missing).
    pub fn name(&self, code: u16) -> Option<&str> {
        code.checked_sub(1)
            .and_then(|i| self.names.get(usize::from(i)))
            .map(String::as_str)
    }

    /// Number of codes including 0.
    pub fn width(&self) -> usize {
        self.names.len() + 1
    }

    /// Codes in display order: schema order for fixed dictionaries, sorted for growing ones.
    pub fn ordered_codes(&self) -> Vec<u16> {
        let mut codes: Vec<u16> = (1..=self.names.len() as u16).collect();
        if !self.fixed {
            codes.sort_by(|a, b| self.name(*a).cmp(&self.name(*b)));
        }
        codes
    }

    pub fn is_fixed(&self) -> bool {
        self.fixed
    }
}

#[derive(Debug, Clone)]
pub enum ColumnData {
    Coded { codes: Vec<u16>, dict: Dict },
    Numeric(Vec<f32>),
}

#[derive(Debug, Clone)]
pub struct Column {
    pub field: &'static FlatField,
    pub data: ColumnData,
}

/// The columnar table.
#[derive(Debug, Clone)]
pub struct Columns {
    len: usize,
    columns: Vec<Column>,
    pseudonyms: Vec<u32>,
    pseudonym_dict: HashMap<String, u32>,
    images: Vec<String>,
    rows_by_image: HashMap<String, usize>,
}

impl Default for Columns {
    fn default() -> Self {
        Columns::new()
    }
}

impl Columns {
    pub fn new() -> Columns {
        let columns = FIELDS
            .iter()
            .map(|field| Column {
                field,
                data: match field.kind {
                    FieldKind::Numeric { .. } => ColumnData::Numeric(Vec::new()),
                    FieldKind::Categorical(values) => ColumnData::Coded {
                        codes: Vec::new(),
                        dict: Dict::fixed(values),
                    },
                    FieldKind::Bool => ColumnData::Coded {
                        codes: Vec::new(),
                        dict: Dict::fixed(&["false", "true"]),
                    },
                    FieldKind::Month | FieldKind::Text => ColumnData::Coded {
                        codes: Vec::new(),
                        dict: Dict::default(),
                    },
                },
            })
            .collect();
        Columns {
            len: 0,
            columns,
            pseudonyms: Vec::new(),
            pseudonym_dict: HashMap::new(),
            images: Vec::new(),
            rows_by_image: HashMap::new(),
        }
    }

    pub fn from_records<'a>(records: impl IntoIterator<Item = &'a Record>) -> Columns {
        let mut columns = Columns::new();
        for record in records {
            columns.upsert(record);
        }
        columns
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn column(&self, name: &str) -> Option<(usize, &Column)> {
        self.columns
            .iter()
            .enumerate()
            .find(|(_, c)| c.field.name == name)
    }

    pub fn columns(&self) -> &[Column] {
        &self.columns
    }

    /// Interned patient pseudonym per row (0 when the record has none).
    pub fn pseudonyms(&self) -> &[u32] {
        &self.pseudonyms
    }

    /// Image hash per row.
    pub fn images(&self) -> &[String] {
        &self.images
    }

    /// Adds a record, or replaces the row of the same image (a forced re-extraction).
    pub fn upsert(&mut self, record: &Record) {
        let row = match self.rows_by_image.get(&record.image_sha256) {
            Some(&row) => row,
            None => {
                let row = self.len;
                self.len += 1;
                self.images.push(record.image_sha256.clone());
                self.rows_by_image.insert(record.image_sha256.clone(), row);
                self.pseudonyms.push(0);
                for column in &mut self.columns {
                    match &mut column.data {
                        ColumnData::Coded { codes, .. } => codes.push(0),
                        ColumnData::Numeric(values) => values.push(f32::NAN),
                    }
                }
                row
            }
        };
        self.pseudonyms[row] = if record.patient.pseudonym.is_empty() {
            0
        } else {
            let next = self.pseudonym_dict.len() as u32 + 1;
            *self
                .pseudonym_dict
                .entry(record.patient.pseudonym.clone())
                .or_insert(next)
        };
        for column in &mut self.columns {
            let cell = (column.field.get)(record);
            match &mut column.data {
                ColumnData::Coded { codes, dict } => {
                    codes[row] = match cell {
                        Cell::Missing | Cell::Number(_) => 0,
                        Cell::Text(t) => dict.insert(&t),
                        Cell::Bool(b) => dict.insert(if b { "true" } else { "false" }),
                    };
                }
                ColumnData::Numeric(values) => {
                    values[row] = match cell {
                        Cell::Number(n) => n as f32,
                        _ => f32::NAN,
                    };
                }
            }
        }
    }
}
