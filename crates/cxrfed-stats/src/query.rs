//! The cohort query language: a compact text for the CLI, parsed into [`Query`].
//!
//! ```text
//! query     = statistic [ "where" condition { "and" condition } ] { clause }
//! statistic = "count"
//!           | "histogram" field
//!           | "crosstab" field "," field [ "," field ]
//!           | "summary" field                      (a numeric field)
//!           | "sum" field | "mean" field          (a numeric field, clamped to its bounds)
//! clause    = "by" field                           (group count / histogram / summary / sum / mean)
//!           | "normalize" "=" ( "row" | "column" | "all" )   (crosstab, histogram)
//! condition = field ( "=" | "!=" ) value
//!           | field [ "not" ] "in" "(" value { "," value } ")"
//!           | field ( "<" | "<=" | ">" | ">=" ) value         (numeric fields and month)
//!           | field "between" value "and" value               (inclusive)
//! value     = "double-quoted" | 'single-quoted' | number | true | false | bare-word
//! ```
//!
//! Keywords are case-insensitive; field names are the flattened record columns
//! (`cxrfed_schema::flat::FIELDS`). Example:
//! `crosstab image_quality, analysis_confidence where age_group in ("60-69","70-79") normalize=row`.
//! Errors carry the byte position of the offending token.

use std::fmt;

/// A parse or validation error at a position of the query text.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("at {position}: {message}")]
pub struct QueryError {
    /// Byte offset into the query text (0-based).
    pub position: usize,
    pub message: String,
}

/// Longest query text accepted, in bytes (structured queries: the sum of their values).
pub const MAX_QUERY_BYTES: usize = 256 * 1024;
/// Most values in one `in (...)` / `not in (...)` list.
pub const MAX_IN_LIST: usize = 10_000;
/// Most conditions joined by `and`.
pub const MAX_CONDITIONS: usize = 32;

/// Checks a parsed query against [`MAX_IN_LIST`] and [`MAX_CONDITIONS`]; the errors name the cap.
fn check_limits(query: Query) -> Result<Query, QueryError> {
    if query.conditions.len() > MAX_CONDITIONS {
        return err(
            0,
            format!(
                "{} conditions, above the cap of {MAX_CONDITIONS} (MAX_CONDITIONS)",
                query.conditions.len()
            ),
        );
    }
    for condition in &query.conditions {
        if let Op::In(values) | Op::NotIn(values) = &condition.op
            && values.len() > MAX_IN_LIST
        {
            return err(
                condition.field.position,
                format!(
                    "{} values in the list for {}, above the cap of {MAX_IN_LIST} (MAX_IN_LIST)",
                    values.len(),
                    condition.field.value
                ),
            );
        }
    }
    Ok(query)
}

fn check_bytes(bytes: usize) -> Result<(), QueryError> {
    if bytes > MAX_QUERY_BYTES {
        return err(
            0,
            format!(
                "the query is {bytes} bytes, above the cap of {MAX_QUERY_BYTES} bytes (MAX_QUERY_BYTES)"
            ),
        );
    }
    Ok(())
}

fn err<T>(position: usize, message: impl Into<String>) -> Result<T, QueryError> {
    Err(QueryError {
        position,
        message: message.into(),
    })
}

#[derive(Debug, Clone, PartialEq)]
pub enum Statistic {
    Count,
    Histogram(Spanned<String>),
    Crosstab(Vec<Spanned<String>>),
    Summary(Spanned<String>),
    Sum(Spanned<String>),
    Mean(Spanned<String>),
}

impl Statistic {
    pub fn name(&self) -> &'static str {
        match self {
            Statistic::Count => "count",
            Statistic::Histogram(_) => "histogram",
            Statistic::Crosstab(_) => "crosstab",
            Statistic::Summary(_) => "summary",
            Statistic::Sum(_) => "sum",
            Statistic::Mean(_) => "mean",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Normalize {
    #[default]
    None,
    Row,
    Column,
    All,
}

/// A value with the position it was written at.
#[derive(Debug, Clone, PartialEq)]
pub struct Spanned<T> {
    pub value: T,
    pub position: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Text(String),
    Number(f64),
    Bool(bool),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Strings have no escapes in the grammar: quote with whichever quote the text does
            // not contain, so that the canonical text parses back to the same value (found
            // by fuzzing: Rust's `{:?}` escaping did not). `structured` refuses text with both.
            Value::Text(t) if t.contains('"') => write!(f, "'{t}'"),
            Value::Text(t) => write!(f, "\"{t}\""),
            Value::Number(n) => write!(f, "{n}"),
            Value::Bool(b) => write!(f, "{b}"),
        }
    }
}

impl Value {
    /// The value as a category or month text.
    pub fn as_text(&self) -> String {
        match self {
            Value::Text(t) => t.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Eq(Spanned<Value>),
    Ne(Spanned<Value>),
    In(Vec<Spanned<Value>>),
    NotIn(Vec<Spanned<Value>>),
    Lt(Spanned<Value>),
    Le(Spanned<Value>),
    Gt(Spanned<Value>),
    Ge(Spanned<Value>),
    Between(Spanned<Value>, Spanned<Value>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub field: Spanned<String>,
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub statistic: Statistic,
    pub conditions: Vec<Condition>,
    pub by: Option<Spanned<String>>,
    pub normalize: Normalize,
}

impl Query {
    /// The query in one canonical text: keywords lower-case, values quoted, conditions sorted.
    /// Two queries that differ only in spacing, case of keywords or order of conditions have the
    /// same canonical text (it keys the per-query contribution selection and the audit log).
    pub fn canonical(&self) -> String {
        let mut out = self.statistic.name().to_string();
        match &self.statistic {
            Statistic::Count => {}
            Statistic::Histogram(f)
            | Statistic::Summary(f)
            | Statistic::Sum(f)
            | Statistic::Mean(f) => {
                out.push(' ');
                out.push_str(&f.value);
            }
            Statistic::Crosstab(fields) => {
                out.push(' ');
                out.push_str(
                    &fields
                        .iter()
                        .map(|f| f.value.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                );
            }
        }
        let mut conditions: Vec<String> = self.conditions.iter().map(canonical_condition).collect();
        conditions.sort();
        if !conditions.is_empty() {
            out.push_str(" where ");
            out.push_str(&conditions.join(" and "));
        }
        if let Some(by) = &self.by {
            out.push_str(" by ");
            out.push_str(&by.value);
        }
        match self.normalize {
            Normalize::None => {}
            Normalize::Row => out.push_str(" normalize=row"),
            Normalize::Column => out.push_str(" normalize=column"),
            Normalize::All => out.push_str(" normalize=all"),
        }
        out
    }
}

fn canonical_condition(c: &Condition) -> String {
    let list = |values: &[Spanned<Value>]| {
        values
            .iter()
            .map(|v| v.value.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let field = &c.field.value;
    match &c.op {
        Op::Eq(v) => format!("{field} = {}", v.value),
        Op::Ne(v) => format!("{field} != {}", v.value),
        Op::In(v) => format!("{field} in ({})", list(v)),
        Op::NotIn(v) => format!("{field} not in ({})", list(v)),
        Op::Lt(v) => format!("{field} < {}", v.value),
        Op::Le(v) => format!("{field} <= {}", v.value),
        Op::Gt(v) => format!("{field} > {}", v.value),
        Op::Ge(v) => format!("{field} >= {}", v.value),
        Op::Between(a, b) => format!("{field} between {} and {}", a.value, b.value),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Str(String),
    Num(f64),
    Sym(&'static str),
    End,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Word(w) => write!(f, "'{w}'"),
            Tok::Str(s) => write!(f, "\"{s}\""),
            Tok::Num(n) => write!(f, "{n}"),
            Tok::Sym(s) => write!(f, "'{s}'"),
            Tok::End => f.write_str("the end of the query"),
        }
    }
}

fn tokenize(text: &str) -> Result<Vec<(Tok, usize)>, QueryError> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        match c {
            b'"' | b'\'' => {
                let quote = c;
                i += 1;
                let from = i;
                while i < bytes.len() && bytes[i] != quote {
                    i += 1;
                }
                if i == bytes.len() {
                    return err(start, "unterminated string");
                }
                out.push((Tok::Str(text[from..i].to_string()), start));
                i += 1;
            }
            b'(' | b')' | b',' | b'=' => {
                let sym = match c {
                    b'(' => "(",
                    b')' => ")",
                    b',' => ",",
                    _ => "=",
                };
                out.push((Tok::Sym(sym), start));
                i += 1;
            }
            b'!' | b'<' | b'>' => {
                let two = bytes.get(i + 1) == Some(&b'=');
                let sym = match (c, two) {
                    (b'!', true) => "!=",
                    (b'<', true) => "<=",
                    (b'>', true) => ">=",
                    (b'<', false) => "<",
                    (b'>', false) => ">",
                    _ => return err(start, "'!' must be followed by '='"),
                };
                out.push((Tok::Sym(sym), start));
                i += if two { 2 } else { 1 };
            }
            _ if c.is_ascii_digit() || c == b'-' || c == b'.' => {
                // Numbers, and bare words that start with a digit (age bands like 60-69,
                // months like 2020-01) which are read as text.
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric() || b"-.+_".contains(&bytes[i]))
                {
                    i += 1;
                }
                let word = &text[start..i];
                match word.parse::<f64>() {
                    Ok(n) if n.is_finite() => out.push((Tok::Num(n), start)),
                    _ => out.push((Tok::Word(word.to_string()), start)),
                }
            }
            _ if c.is_ascii_alphabetic() || c == b'_' => {
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric() || b"_-+".contains(&bytes[i]))
                {
                    i += 1;
                }
                out.push((Tok::Word(text[start..i].to_string()), start));
            }
            _ => {
                let ch = text[start..].chars().next().unwrap_or('?');
                return err(start, format!("unexpected character {ch:?}"));
            }
        }
    }
    out.push((Tok::End, text.len()));
    Ok(out)
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> &(Tok, usize) {
        &self.toks[self.at.min(self.toks.len() - 1)]
    }

    fn next(&mut self) -> (Tok, usize) {
        let t = self.peek().clone();
        if self.at < self.toks.len() - 1 {
            self.at += 1;
        }
        t
    }

    fn is_keyword(&self, kw: &str) -> bool {
        matches!(&self.peek().0, Tok::Word(w) if w.eq_ignore_ascii_case(kw))
    }

    fn expect_sym(&mut self, sym: &str) -> Result<usize, QueryError> {
        match self.next() {
            (Tok::Sym(s), p) if s == sym => Ok(p),
            (t, p) => err(p, format!("expected '{sym}', found {t}")),
        }
    }

    fn expect_keyword(&mut self, kw: &str) -> Result<usize, QueryError> {
        match self.next() {
            (Tok::Word(w), p) if w.eq_ignore_ascii_case(kw) => Ok(p),
            (t, p) => err(p, format!("expected '{kw}', found {t}")),
        }
    }

    fn field(&mut self) -> Result<Spanned<String>, QueryError> {
        match self.next() {
            (Tok::Word(w), p) if !is_reserved(&w) => Ok(Spanned {
                value: w.to_ascii_lowercase(),
                position: p,
            }),
            (t, p) => err(p, format!("expected a field name, found {t}")),
        }
    }

    fn value(&mut self) -> Result<Spanned<Value>, QueryError> {
        let (tok, position) = self.next();
        let value = match tok {
            Tok::Str(s) => Value::Text(s),
            Tok::Num(n) => Value::Number(n),
            Tok::Word(w) if w.eq_ignore_ascii_case("true") => Value::Bool(true),
            Tok::Word(w) if w.eq_ignore_ascii_case("false") => Value::Bool(false),
            Tok::Word(w) if !is_reserved(&w) => Value::Text(w),
            t => return err(position, format!("expected a value, found {t}")),
        };
        Ok(Spanned { value, position })
    }

    fn value_list(&mut self) -> Result<Vec<Spanned<Value>>, QueryError> {
        self.expect_sym("(")?;
        let mut values = vec![self.value()?];
        loop {
            match self.next() {
                (Tok::Sym(","), _) => values.push(self.value()?),
                (Tok::Sym(")"), _) => return Ok(values),
                (t, p) => return err(p, format!("expected ',' or ')', found {t}")),
            }
        }
    }

    fn condition(&mut self) -> Result<Condition, QueryError> {
        let field = self.field()?;
        let (tok, position) = self.next();
        let op = match tok {
            Tok::Sym("=") => Op::Eq(self.value()?),
            Tok::Sym("!=") => Op::Ne(self.value()?),
            Tok::Sym("<") => Op::Lt(self.value()?),
            Tok::Sym("<=") => Op::Le(self.value()?),
            Tok::Sym(">") => Op::Gt(self.value()?),
            Tok::Sym(">=") => Op::Ge(self.value()?),
            Tok::Word(w) if w.eq_ignore_ascii_case("in") => Op::In(self.value_list()?),
            Tok::Word(w) if w.eq_ignore_ascii_case("not") => {
                self.expect_keyword("in")?;
                Op::NotIn(self.value_list()?)
            }
            Tok::Word(w) if w.eq_ignore_ascii_case("between") => {
                let lo = self.value()?;
                self.expect_keyword("and")?;
                Op::Between(lo, self.value()?)
            }
            t => {
                return err(
                    position,
                    format!(
                        "expected a comparison (=, !=, in, not in, <, <=, >, >=, between), found {t}"
                    ),
                );
            }
        };
        Ok(Condition { field, op })
    }
}

const RESERVED: &[&str] = &[
    "where",
    "and",
    "in",
    "not",
    "between",
    "by",
    "normalize",
    "count",
    "histogram",
    "crosstab",
    "summary",
];

fn is_reserved(word: &str) -> bool {
    RESERVED.iter().any(|r| r.eq_ignore_ascii_case(word))
}

/// Parses query text (syntax only; [`crate::Catalog::bind`] checks fields and values).
pub fn parse(text: &str) -> Result<Query, QueryError> {
    check_bytes(text.len())?;
    let mut p = Parser {
        toks: tokenize(text)?,
        at: 0,
    };
    let statistic = match p.next() {
        (Tok::Word(w), _) if w.eq_ignore_ascii_case("count") => Statistic::Count,
        (Tok::Word(w), _) if w.eq_ignore_ascii_case("histogram") => {
            Statistic::Histogram(p.field()?)
        }
        (Tok::Word(w), _) if w.eq_ignore_ascii_case("summary") => Statistic::Summary(p.field()?),
        (Tok::Word(w), _) if w.eq_ignore_ascii_case("sum") => Statistic::Sum(p.field()?),
        (Tok::Word(w), _) if w.eq_ignore_ascii_case("mean") => Statistic::Mean(p.field()?),
        (Tok::Word(w), _) if w.eq_ignore_ascii_case("crosstab") => {
            let mut fields = vec![p.field()?];
            p.expect_sym(",")?;
            fields.push(p.field()?);
            if matches!(p.peek().0, Tok::Sym(",")) {
                p.next();
                fields.push(p.field()?);
            }
            Statistic::Crosstab(fields)
        }
        (t, pos) => {
            return err(
                pos,
                format!("expected count, histogram, crosstab, summary, sum or mean, found {t}"),
            );
        }
    };
    let mut query = Query {
        statistic,
        conditions: Vec::new(),
        by: None,
        normalize: Normalize::None,
    };
    if p.is_keyword("where") {
        p.next();
        query.conditions.push(p.condition()?);
        while p.is_keyword("and") {
            p.next();
            query.conditions.push(p.condition()?);
        }
    }
    loop {
        if p.is_keyword("by") {
            let (_, pos) = p.next();
            if query.by.is_some() {
                return err(pos, "'by' given twice");
            }
            query.by = Some(p.field()?);
        } else if p.is_keyword("normalize") {
            p.next();
            p.expect_sym("=")?;
            query.normalize = match p.next() {
                (Tok::Word(w), _) if w.eq_ignore_ascii_case("row") => Normalize::Row,
                (Tok::Word(w), _) if w.eq_ignore_ascii_case("column") => Normalize::Column,
                (Tok::Word(w), _) if w.eq_ignore_ascii_case("all") => Normalize::All,
                (t, pos) => return err(pos, format!("expected row, column or all, found {t}")),
            };
        } else {
            break;
        }
    }
    match p.next() {
        (Tok::End, _) => check_limits(query),
        (t, pos) => err(
            pos,
            format!("unexpected {t}; expected 'where', 'and', 'by', 'normalize' or the end"),
        ),
    }
}

/// A structured query (the proto form) as a [`Query`]. Values are read as numbers, booleans
/// or text; positions in errors are the condition's index.
pub fn structured(
    statistic: &str,
    fields: &[String],
    conditions: &[(String, String, Vec<String>)],
    by: &str,
    normalize: &str,
) -> Result<Query, QueryError> {
    check_bytes(
        statistic.len()
            + by.len()
            + normalize.len()
            + fields.iter().map(String::len).sum::<usize>()
            + conditions
                .iter()
                .map(|(f, o, v)| f.len() + o.len() + v.iter().map(String::len).sum::<usize>())
                .sum::<usize>(),
    )?;
    if let Some((i, _)) = conditions
        .iter()
        .enumerate()
        .find(|(_, (_, _, v))| v.len() > MAX_IN_LIST)
    {
        // Refused before the values are converted.
        return err(
            i,
            format!(
                "{} values in condition {i}, above the cap of {MAX_IN_LIST} (MAX_IN_LIST)",
                conditions[i].2.len()
            ),
        );
    }
    let at = |position: usize, value: String| Spanned { value, position };
    let value = |text: &str, position: usize| Spanned {
        value: match text.trim() {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            t => match t.parse::<f64>() {
                Ok(n) if n.is_finite() => Value::Number(n),
                _ => Value::Text(t.to_string()),
            },
        },
        position,
    };
    let field_count = |n: std::ops::RangeInclusive<usize>| {
        if n.contains(&fields.len()) {
            Ok(())
        } else {
            err(
                0,
                format!(
                    "{statistic} takes {}..={} fields, got {}",
                    n.start(),
                    n.end(),
                    fields.len()
                ),
            )
        }
    };
    let statistic = match statistic.trim().to_ascii_lowercase().as_str() {
        "count" => {
            field_count(0..=0)?;
            Statistic::Count
        }
        "histogram" => {
            field_count(1..=1)?;
            Statistic::Histogram(at(0, fields[0].clone()))
        }
        "summary" => {
            field_count(1..=1)?;
            Statistic::Summary(at(0, fields[0].clone()))
        }
        "sum" => {
            field_count(1..=1)?;
            Statistic::Sum(at(0, fields[0].clone()))
        }
        "mean" => {
            field_count(1..=1)?;
            Statistic::Mean(at(0, fields[0].clone()))
        }
        "crosstab" => {
            field_count(2..=3)?;
            Statistic::Crosstab(
                fields
                    .iter()
                    .enumerate()
                    .map(|(i, f)| at(i, f.clone()))
                    .collect(),
            )
        }
        other => {
            return err(
                0,
                format!(
                    "statistic {other:?} must be count, histogram, crosstab, summary, sum or mean"
                ),
            );
        }
    };
    if let Some(i) = conditions
        .iter()
        .position(|(_, _, v)| v.iter().any(|t| t.contains('"') && t.contains('\'')))
    {
        return err(
            i,
            format!("condition {i}: a value cannot contain both ' and \""),
        );
    }
    let mut parsed = Vec::new();
    for (i, (field, op, values)) in conditions.iter().enumerate() {
        let one = || -> Result<Spanned<Value>, QueryError> {
            match values.as_slice() {
                [v] => Ok(value(v, i)),
                _ => err(i, format!("condition {i} ({field} {op}) takes one value")),
            }
        };
        let op = match op.trim().to_ascii_lowercase().as_str() {
            "=" | "==" => Op::Eq(one()?),
            "!=" => Op::Ne(one()?),
            "<" => Op::Lt(one()?),
            "<=" => Op::Le(one()?),
            ">" => Op::Gt(one()?),
            ">=" => Op::Ge(one()?),
            "in" | "not in" | "not_in" if values.is_empty() => {
                return err(i, format!("condition {i} ({field} in) needs values"));
            }
            "in" => Op::In(values.iter().map(|v| value(v, i)).collect()),
            "not in" | "not_in" => Op::NotIn(values.iter().map(|v| value(v, i)).collect()),
            "between" => match values.as_slice() {
                [a, b] => Op::Between(value(a, i), value(b, i)),
                _ => {
                    return err(
                        i,
                        format!("condition {i} ({field} between) takes two values"),
                    );
                }
            },
            other => return err(i, format!("condition {i}: unknown operator {other:?}")),
        };
        parsed.push(Condition {
            field: at(i, field.trim().to_ascii_lowercase()),
            op,
        });
    }
    check_limits(Query {
        statistic,
        conditions: parsed,
        by: Some(by.trim())
            .filter(|b| !b.is_empty())
            .map(|b| at(0, b.to_ascii_lowercase())),
        normalize: match normalize.trim().to_ascii_lowercase().as_str() {
            "" | "none" => Normalize::None,
            "row" => Normalize::Row,
            "column" => Normalize::Column,
            "all" => Normalize::All,
            other => return err(0, format!("normalize {other:?} must be row, column or all")),
        },
    })
}

/// Parses only a filter (`a = "x" and b in (...)`), as `export --where` takes it.
pub fn parse_filter(text: &str) -> Result<Vec<Condition>, QueryError> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let prefix = "count where ";
    parse(&format!("{prefix}{text}"))
        .map(|q| q.conditions)
        .map_err(|e| QueryError {
            position: e.position.saturating_sub(prefix.len()),
            message: e.message,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_text_parses_back_to_itself() {
        for text in [
            r#"count where view in ("61\0\0Z-79", 'say "hi"')"#,
            r#"crosstab view, sex where sex = "F""#,
        ] {
            let canonical = parse(text).expect("parse").canonical();
            assert_eq!(parse(&canonical).expect("reparse").canonical(), canonical);
        }
        let both = vec![r#"a"b'c"#.to_string()];
        assert!(structured("count", &[], &[("view".into(), "in".into(), both)], "", "").is_err());
    }

    #[test]
    fn size_caps_are_named() {
        let list = |n: usize| {
            (0..n)
                .map(|i| (i % 4096).to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        parse(&format!("count where rows in ({})", list(MAX_IN_LIST))).expect("at the cap");
        let e =
            parse(&format!("count where rows in ({})", list(MAX_IN_LIST + 1))).expect_err("over");
        assert!(e.message.contains("MAX_IN_LIST"), "{}", e.message);
        let e = parse(&format!("count where rows in ({})", list(200_000))).expect_err("bytes");
        assert!(e.message.contains("MAX_QUERY_BYTES"), "{}", e.message);
        let many = vec!["rows > 1"; MAX_CONDITIONS + 1].join(" and ");
        let e = parse(&format!("count where {many}")).expect_err("conditions");
        assert!(e.message.contains("MAX_CONDITIONS"), "{}", e.message);
        let values: Vec<String> = (0..=MAX_IN_LIST).map(|i| i.to_string()).collect();
        let e = structured(
            "count",
            &[],
            &[("rows".into(), "in".into(), values)],
            "",
            "",
        )
        .expect_err("structured");
        assert!(e.message.contains("MAX_IN_LIST"), "{}", e.message);
    }

    #[test]
    fn the_seed_query_parses() {
        let q = parse(
            r#"crosstab image_quality, analysis_confidence where age_group in ("60-69","70-79") normalize=row"#,
        )
        .expect("parse");
        let Statistic::Crosstab(fields) = &q.statistic else {
            panic!("crosstab")
        };
        assert_eq!(fields[0].value, "image_quality");
        assert_eq!(fields[1].value, "analysis_confidence");
        assert_eq!(q.normalize, Normalize::Row);
        assert_eq!(q.conditions.len(), 1);
        assert!(matches!(&q.conditions[0].op, Op::In(v) if v.len() == 2));
    }

    #[test]
    fn bare_words_numbers_and_ranges() {
        let q = parse("summary cardiothoracic_ratio where view = PA and month between 2020-01 and 2020-12 and rows >= 1024 by sex")
            .expect("parse");
        assert_eq!(q.conditions.len(), 3);
        assert!(matches!(&q.conditions[0].op, Op::Eq(v) if v.value == Value::Text("PA".into())));
        assert!(
            matches!(&q.conditions[1].op, Op::Between(a, _) if a.value == Value::Text("2020-01".into()))
        );
        assert!(matches!(&q.conditions[2].op, Op::Ge(v) if v.value == Value::Number(1024.0)));
        assert_eq!(q.by.as_ref().map(|b| b.value.as_str()), Some("sex"));
    }

    #[test]
    fn errors_point_at_the_offending_token() {
        let e = parse("crosstab image_quality analysis_confidence").expect_err("missing comma");
        assert_eq!(e.position, 23);
        assert!(e.message.contains("expected ','"), "{e}");
        let e = parse("count where view ~ PA").expect_err("bad char");
        assert_eq!(e.position, 17);
        let e = parse("count where view = ").expect_err("no value");
        assert_eq!(e.position, 19);
        let e = parse("histogram where").expect_err("keyword as field");
        assert_eq!(e.position, 10);
        let e = parse("count normalize=sideways").expect_err("bad normalize");
        assert_eq!(e.position, 16);
        let e = parse("tally").expect_err("unknown statistic");
        assert_eq!(e.position, 0);
        let e = parse_filter("view = PA and").expect_err("dangling and");
        assert_eq!(e.position, 13);
    }
}
