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
    pub fn fixed(values: &[&str]) -> Dict {
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
    pub name: String,
    pub kind: FieldKind,
    pub data: ColumnData,
}

/// Where a column's values come from.
#[derive(Debug, Clone, Copy)]
enum Origin {
    /// A schema field, read from the record.
    Schema(&'static FlatField),
    /// Human labels of schema findings: `<field>_annotated`.
    Annotation,
    /// A custom field: its human label where there is one, else the model's value (a head a
    /// federated job trained for it).
    Custom,
}

/// The columnar table.
#[derive(Debug, Clone)]
pub struct Columns {
    len: usize,
    columns: Vec<Column>,
    origins: Vec<Origin>,
    pseudonyms: Vec<u32>,
    pseudonym_dict: HashMap<String, u32>,
    images: Vec<String>,
    rows_by_image: HashMap<String, usize>,
    /// The model's values of custom fields by field and row (kept for fields whose column is
    /// defined later).
    model_values: HashMap<String, HashMap<usize, String>>,
    /// Rows with a human label, per custom field: the model's value does not replace them.
    labelled: HashMap<String, std::collections::HashSet<usize>>,
}

impl Default for Columns {
    fn default() -> Self {
        Columns::new()
    }
}

impl Columns {
    pub fn new() -> Columns {
        let empty = |kind: FieldKind| match kind {
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
        };
        let mut columns = Vec::new();
        let mut origins = Vec::new();
        for field in FIELDS {
            columns.push(Column {
                name: field.name.to_string(),
                kind: field.kind,
                data: empty(field.kind),
            });
            origins.push(Origin::Schema(field));
        }
        // Human corrections of the findings, next to the model's values.
        for field in FIELDS.iter().filter(|f| f.probability.is_some()) {
            columns.push(Column {
                name: format!("{}_annotated", field.name),
                kind: field.kind,
                data: empty(field.kind),
            });
            origins.push(Origin::Annotation);
        }
        Columns {
            len: 0,
            columns,
            origins,
            pseudonyms: Vec::new(),
            pseudonym_dict: HashMap::new(),
            images: Vec::new(),
            rows_by_image: HashMap::new(),
            model_values: HashMap::new(),
            labelled: HashMap::new(),
        }
    }

    fn set_cell(data: &mut ColumnData, row: usize, value: Option<&str>) {
        match data {
            ColumnData::Coded { codes, dict } => {
                codes[row] = value.and_then(|v| dict.code(v)).unwrap_or(0);
            }
            ColumnData::Numeric(values) => {
                values[row] = value
                    .and_then(|v| v.parse::<f32>().ok())
                    .unwrap_or(f32::NAN);
            }
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
            .find(|(_, c)| c.name == name)
    }

    /// Adds a custom field's column (or replaces it, emptied, when redefined): its values
    /// come from annotations, see [`Columns::annotate`].
    pub fn define_custom(&mut self, definition: &cxrfed_schema::custom::FieldDefinition) {
        use cxrfed_schema::custom::CustomKind;
        let len = self.len;
        let (kind, data) = match &definition.kind {
            CustomKind::Bool => (
                FieldKind::Bool,
                ColumnData::Coded {
                    codes: vec![0; len],
                    dict: Dict::fixed(&["false", "true"]),
                },
            ),
            CustomKind::Categorical { values } => (
                FieldKind::Text,
                ColumnData::Coded {
                    codes: vec![0; len],
                    dict: Dict::fixed(&values.iter().map(String::as_str).collect::<Vec<_>>()),
                },
            ),
            CustomKind::Numeric { min, max } => (
                FieldKind::Numeric {
                    min: *min,
                    max: *max,
                },
                ColumnData::Numeric(vec![f32::NAN; len]),
            ),
        };
        let column = Column {
            name: definition.name.clone(),
            kind,
            data,
        };
        let index = match self.column(&definition.name).map(|(i, _)| i) {
            Some(i) => {
                self.columns[i] = column;
                i
            }
            None => {
                self.columns.push(column);
                self.origins.push(Origin::Custom);
                self.columns.len() - 1
            }
        };
        // A new definition starts from the model's values; labels are applied after it.
        self.labelled.remove(&definition.name);
        if let Some(values) = self.model_values.get(&definition.name) {
            for (row, value) in values {
                Self::set_cell(&mut self.columns[index].data, *row, Some(value));
            }
        }
    }

    /// Records a human label: the custom field's column, or `<field>_annotated` for a schema
    /// finding. Labels for images without a row, or fields without a column, are ignored.
    pub fn annotate(&mut self, image_sha256: &str, field: &str, value: &str) {
        let Some(&row) = self.rows_by_image.get(image_sha256) else {
            return;
        };
        let name = if cxrfed_schema::flat::field(field).is_some() {
            format!("{field}_annotated")
        } else {
            field.to_string()
        };
        let Some(index) = self.column(&name).map(|(i, _)| i) else {
            return;
        };
        if matches!(self.origins[index], Origin::Custom) {
            self.labelled.entry(name).or_default().insert(row);
        }
        Self::set_cell(&mut self.columns[index].data, row, Some(value));
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
        for (field, values) in self.model_values.iter_mut() {
            if !record.model_fields.contains_key(field) {
                values.remove(&row);
            }
        }
        for (field, value) in &record.model_fields {
            self.model_values
                .entry(field.clone())
                .or_default()
                .insert(row, value.clone());
        }
        for (column, origin) in self.columns.iter_mut().zip(&self.origins) {
            if matches!(origin, Origin::Custom) {
                let labelled = self
                    .labelled
                    .get(&column.name)
                    .is_some_and(|rows| rows.contains(&row));
                if !labelled {
                    let value = record.model_fields.get(&column.name).map(String::as_str);
                    Self::set_cell(&mut column.data, row, value);
                }
                continue;
            }
            let Origin::Schema(field) = origin else {
                continue;
            };
            let cell = (field.get)(record);
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
