//! Exact aggregation over [`Columns`]: a query is bound to the columns (field names, kinds and
//! values checked, each condition turned into a per-code mask or a numeric range), then
//! evaluated in one pass over the rows.
//!
//! A record whose value of a condition's field is missing never matches that condition.
//! Missing values of a tabulated field appear as their own `(missing)` category when present.

use serde::Serialize;

use cxrfed_schema::flat::FieldKind;

use crate::columns::{ColumnData, Columns, Dict};
use crate::query::{Condition, Normalize, Op, Query, QueryError, Spanned, Statistic, Value};

pub const MISSING: &str = "(missing)";

/// One cell of a result table.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum TableCell {
    Text(String),
    Count(u64),
    Number(f64),
    Empty,
}

/// A result: named columns and rows, ready for a terminal, CSV, JSON or pandas.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Table {
    pub statistic: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<TableCell>>,
    /// Records that passed the filters.
    pub cohort_size: u64,
}

#[derive(Debug, Clone)]
enum Pred {
    /// Allowed per code (index = code).
    Codes(Vec<bool>),
    /// Numeric: allowed when `test` holds.
    Numeric(NumTest),
}

/// A numeric test. `In`/`NotIn` hold their values sorted and deduplicated, so membership is a
/// binary search: a query's cost is O(rows × log values), not O(rows × values).
#[derive(Debug, Clone)]
enum NumTest {
    In(Vec<f64>),
    NotIn(Vec<f64>),
    Range {
        lo: f64,
        lo_inclusive: bool,
        hi: f64,
        hi_inclusive: bool,
    },
}

impl NumTest {
    fn holds(&self, x: f64) -> bool {
        if x.is_nan() {
            return false;
        }
        match self {
            NumTest::In(v) => member(v, x),
            NumTest::NotIn(v) => !member(v, x),
            NumTest::Range {
                lo,
                lo_inclusive,
                hi,
                hi_inclusive,
            } => {
                (if *lo_inclusive { x >= *lo } else { x > *lo })
                    && (if *hi_inclusive { x <= *hi } else { x < *hi })
            }
        }
    }
}

fn member(sorted: &[f64], x: f64) -> bool {
    let x = if x == 0.0 { 0.0 } else { x };
    sorted.binary_search_by(|v| v.total_cmp(&x)).is_ok()
}

/// Values sorted and deduplicated for [`member`] (-0.0 and 0.0 are one value).
fn value_set(mut values: Vec<f64>) -> Vec<f64> {
    for v in &mut values {
        if *v == 0.0 {
            *v = 0.0;
        }
    }
    values.sort_by(f64::total_cmp);
    values.dedup();
    values
}

/// A condition bound to a column.
#[derive(Debug, Clone)]
pub struct BoundFilter {
    column: usize,
    pred: Pred,
}

/// A query bound to a set of columns.
#[derive(Debug, Clone)]
pub struct Bound {
    pub query: Query,
    filters: Vec<BoundFilter>,
    /// Tabulated coded columns (crosstab fields, or histogram field with its `by`).
    tab: Vec<usize>,
    /// The numeric column of a summary.
    numeric: Option<usize>,
    /// The grouping column of count / summary.
    by: Option<usize>,
}

fn field_error<T>(at: &Spanned<String>, message: String) -> Result<T, QueryError> {
    Err(QueryError {
        position: at.position,
        message,
    })
}

fn known_fields(columns: &Columns) -> String {
    columns
        .columns()
        .iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn lookup(columns: &Columns, name: &Spanned<String>) -> Result<usize, QueryError> {
    columns
        .column(&name.value)
        .map(|(i, _)| i)
        .ok_or_else(|| QueryError {
            position: name.position,
            message: format!(
                "unknown field {:?}; fields: {}",
                name.value,
                known_fields(columns)
            ),
        })
}

fn coded(columns: &Columns, name: &Spanned<String>, role: &str) -> Result<usize, QueryError> {
    let index = lookup(columns, name)?;
    match &columns.columns()[index].data {
        ColumnData::Coded { .. } => Ok(index),
        ColumnData::Numeric(_) => field_error(
            name,
            format!(
                "{} is numeric and cannot be {role}; use `summary {}`",
                name.value, name.value
            ),
        ),
    }
}

fn number(v: &Spanned<Value>, field: &str) -> Result<f64, QueryError> {
    match &v.value {
        Value::Number(n) => Ok(*n),
        other => Err(QueryError {
            position: v.position,
            message: format!("{field} is numeric; {other} is not a number"),
        }),
    }
}

fn category_code(
    dict: &Dict,
    kind: FieldKind,
    field: &str,
    v: &Spanned<Value>,
) -> Result<Option<u16>, QueryError> {
    let text = v.value.as_text();
    if kind == FieldKind::Month
        && !(text.len() == 7
            && text.as_bytes()[4] == b'-'
            && text[..4].bytes().all(|b| b.is_ascii_digit())
            && text[5..].bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(QueryError {
            position: v.position,
            message: format!("month values are YYYY-MM, not {}", v.value),
        });
    }
    match dict.code(&text) {
        Some(code) => Ok(Some(code)),
        None if dict.is_fixed() => Err(QueryError {
            position: v.position,
            message: format!(
                "{} is not a value of {field}; one of: {}",
                v.value,
                dict.ordered_codes()
                    .iter()
                    .filter_map(|c| dict.name(*c))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
        // A month or modality that no record has: matches nothing.
        None => Ok(None),
    }
}

fn bind_condition(columns: &Columns, condition: &Condition) -> Result<BoundFilter, QueryError> {
    let column = lookup(columns, &condition.field)?;
    let col = &columns.columns()[column];
    let name = col.name.as_str();
    let pred = match &col.data {
        ColumnData::Numeric(_) => Pred::Numeric(match &condition.op {
            Op::Eq(v) => NumTest::In(value_set(vec![number(v, name)?])),
            Op::Ne(v) => NumTest::NotIn(value_set(vec![number(v, name)?])),
            Op::In(vs) => NumTest::In(value_set(
                vs.iter()
                    .map(|v| number(v, name))
                    .collect::<Result<_, _>>()?,
            )),
            Op::NotIn(vs) => NumTest::NotIn(value_set(
                vs.iter()
                    .map(|v| number(v, name))
                    .collect::<Result<_, _>>()?,
            )),
            Op::Lt(v) => range(f64::NEG_INFINITY, true, number(v, name)?, false),
            Op::Le(v) => range(f64::NEG_INFINITY, true, number(v, name)?, true),
            Op::Gt(v) => range(number(v, name)?, false, f64::INFINITY, true),
            Op::Ge(v) => range(number(v, name)?, true, f64::INFINITY, true),
            Op::Between(a, b) => range(number(a, name)?, true, number(b, name)?, true),
        }),
        ColumnData::Coded { dict, .. } => {
            let kind = col.kind;
            let mut allowed = vec![false; dict.width()];
            let set = |allowed: &mut Vec<bool>, values: &[Spanned<Value>], to: bool| {
                for v in values {
                    if let Some(code) = category_code(dict, kind, name, v)? {
                        allowed[usize::from(code)] = to;
                    }
                }
                Ok::<(), QueryError>(())
            };
            match &condition.op {
                Op::Eq(v) => set(&mut allowed, std::slice::from_ref(v), true)?,
                Op::In(vs) => set(&mut allowed, vs, true)?,
                Op::Ne(v) => {
                    allowed.iter_mut().skip(1).for_each(|a| *a = true);
                    set(&mut allowed, std::slice::from_ref(v), false)?;
                }
                Op::NotIn(vs) => {
                    allowed.iter_mut().skip(1).for_each(|a| *a = true);
                    set(&mut allowed, vs, false)?;
                }
                op => {
                    if kind != FieldKind::Month {
                        return field_error(
                            &condition.field,
                            format!(
                                "{name} is categorical: use =, !=, in or not in (ranges work on numeric fields and month)"
                            ),
                        );
                    }
                    let (lo, hi) = match op {
                        Op::Lt(v) => (None, Some((v, false))),
                        Op::Le(v) => (None, Some((v, true))),
                        Op::Gt(v) => (Some((v, false)), None),
                        Op::Ge(v) => (Some((v, true)), None),
                        Op::Between(a, b) => (Some((a, true)), Some((b, true))),
                        _ => (None, None),
                    };
                    for bound in [lo, hi].into_iter().flatten() {
                        category_code(dict, kind, name, bound.0)?;
                    }
                    for code in 1..dict.width() as u16 {
                        let Some(month) = dict.name(code) else {
                            continue;
                        };
                        let above = lo.is_none_or(|(v, inclusive)| {
                            let t = v.value.as_text();
                            if inclusive {
                                month >= t.as_str()
                            } else {
                                month > t.as_str()
                            }
                        });
                        let below = hi.is_none_or(|(v, inclusive)| {
                            let t = v.value.as_text();
                            if inclusive {
                                month <= t.as_str()
                            } else {
                                month < t.as_str()
                            }
                        });
                        allowed[usize::from(code)] = above && below;
                    }
                }
            }
            Pred::Codes(allowed)
        }
    };
    Ok(BoundFilter { column, pred })
}

fn range(lo: f64, lo_inclusive: bool, hi: f64, hi_inclusive: bool) -> NumTest {
    NumTest::Range {
        lo,
        lo_inclusive,
        hi,
        hi_inclusive,
    }
}

/// Binds a parsed query to `columns`: every field exists and fits its role, every value is
/// valid for its field.
pub fn bind(columns: &Columns, query: Query) -> Result<Bound, QueryError> {
    let filters = query
        .conditions
        .iter()
        .map(|c| bind_condition(columns, c))
        .collect::<Result<Vec<_>, _>>()?;
    let mut tab = Vec::new();
    let mut numeric = None;
    let mut by = None;
    match &query.statistic {
        Statistic::Count => {
            if let Some(b) = &query.by {
                by = Some(coded(columns, b, "grouped by")?);
            }
        }
        Statistic::Histogram(f) => {
            if let Some(b) = &query.by {
                tab.push(coded(columns, b, "grouped by")?);
            }
            tab.push(coded(columns, f, "tabulated")?);
        }
        Statistic::Crosstab(fields) => {
            if let Some(b) = &query.by {
                return field_error(
                    b,
                    "crosstab takes no 'by': add the field to the crosstab".into(),
                );
            }
            for f in fields {
                let index = coded(columns, f, "tabulated")?;
                if tab.contains(&index) {
                    return field_error(f, format!("{} appears twice", f.value));
                }
                tab.push(index);
            }
        }
        Statistic::Summary(f) | Statistic::Sum(f) | Statistic::Mean(f) => {
            let index = lookup(columns, f)?;
            if !matches!(columns.columns()[index].data, ColumnData::Numeric(_)) {
                return field_error(
                    f,
                    format!("{} is not numeric; use `histogram {}`", f.value, f.value),
                );
            }
            numeric = Some(index);
            if let Some(b) = &query.by {
                by = Some(coded(columns, b, "grouped by")?);
            }
        }
    }
    if query.normalize != Normalize::None
        && !matches!(
            query.statistic,
            Statistic::Crosstab(_) | Statistic::Histogram(_)
        )
    {
        return Err(QueryError {
            position: 0,
            message: "normalize applies to crosstab and histogram".into(),
        });
    }
    Ok(Bound {
        query,
        filters,
        tab,
        numeric,
        by,
    })
}

impl Bound {
    /// Whether `row` passes every condition.
    pub fn matches(&self, columns: &Columns, row: usize) -> bool {
        self.filters
            .iter()
            .all(|f| match (&f.pred, &columns.columns()[f.column].data) {
                (Pred::Codes(allowed), ColumnData::Coded { codes, .. }) => allowed
                    .get(usize::from(codes[row]))
                    .copied()
                    .unwrap_or(false),
                (Pred::Numeric(test), ColumnData::Numeric(values)) => {
                    test.holds(f64::from(values[row]))
                }
                _ => false,
            })
    }

    /// Rows that pass the filters.
    pub fn cohort(&self, columns: &Columns) -> Vec<usize> {
        (0..columns.len())
            .filter(|&row| self.matches(columns, row))
            .collect()
    }

    /// The coded columns this query tabulates (crosstab fields, or `by` then the histogram field).
    pub fn tabulated(&self) -> &[usize] {
        &self.tab
    }

    pub fn numeric_column(&self) -> Option<usize> {
        self.numeric
    }

    pub fn group_column(&self) -> Option<usize> {
        self.by
    }
}

pub(crate) fn dict_of(columns: &Columns, index: usize) -> (&Dict, &[u16]) {
    match &columns.columns()[index].data {
        ColumnData::Coded { dict, codes } => (dict, codes.as_slice()),
        ColumnData::Numeric(_) => unreachable_numeric(),
    }
}

#[allow(clippy::panic)]
fn unreachable_numeric() -> ! {
    // `bind` only lets coded columns be tabulated.
    panic!("a numeric column was bound as coded")
}

fn label(dict: &Dict, code: u16) -> String {
    dict.name(code).unwrap_or(MISSING).to_string()
}

/// Codes to show: the dictionary's in order, plus missing (0) when it occurs.
fn shown_codes(dict: &Dict, present_missing: bool) -> Vec<u16> {
    let mut codes = dict.ordered_codes();
    if present_missing {
        codes.push(0);
    }
    codes
}

/// Evaluates a bound query exactly.
pub fn evaluate(columns: &Columns, bound: &Bound) -> Table {
    let statistic = bound.query.statistic.name().to_string();
    if let Statistic::Histogram(_) | Statistic::Crosstab(_) = &bound.query.statistic {
        // Filtered and counted in one pass, without materialising the cohort.
        let counts = count_matching(columns, bound);
        let cohort_size = counts.iter().sum();
        return contingency_table(
            columns,
            &bound.tab,
            &counts,
            bound.query.normalize,
            statistic,
            cohort_size,
        );
    }
    let cohort = bound.cohort(columns);
    let cohort_size = cohort.len() as u64;
    match &bound.query.statistic {
        Statistic::Count => match bound.by {
            None => Table {
                statistic,
                columns: vec!["count".into()],
                rows: vec![vec![TableCell::Count(cohort_size)]],
                cohort_size,
            },
            Some(by) => {
                let (dict, codes) = dict_of(columns, by);
                let mut counts = vec![0u64; dict.width()];
                for &row in &cohort {
                    counts[usize::from(codes[row])] += 1;
                }
                let rows = shown_codes(dict, counts[0] > 0)
                    .into_iter()
                    .map(|c| {
                        vec![
                            TableCell::Text(label(dict, c)),
                            TableCell::Count(counts[usize::from(c)]),
                        ]
                    })
                    .collect();
                Table {
                    statistic,
                    columns: vec![columns.columns()[by].name.clone(), "count".into()],
                    rows,
                    cohort_size,
                }
            }
        },
        Statistic::Histogram(_) | Statistic::Crosstab(_) => unreachable_numeric_or_tabulated(),
        Statistic::Summary(_) => summary(columns, bound, &cohort, statistic, cohort_size),
        Statistic::Sum(_) | Statistic::Mean(_) => {
            let mean = matches!(bound.query.statistic, Statistic::Mean(_));
            let mut header: Vec<String> = Vec::new();
            if let Some(by) = bound.by {
                header.push(columns.columns()[by].name.to_string());
            }
            header.extend(["n".to_string(), statistic.clone()]);
            let rows = numeric_groups(columns, bound, &cohort)
                .into_iter()
                .map(|(group, v)| {
                    let total: f64 = v.iter().sum();
                    let value = if !mean {
                        TableCell::Number(total)
                    } else if v.is_empty() {
                        TableCell::Empty
                    } else {
                        TableCell::Number(total / v.len() as f64)
                    };
                    let mut row: Vec<TableCell> = group.into_iter().map(TableCell::Text).collect();
                    row.extend([TableCell::Count(v.len() as u64), value]);
                    row
                })
                .collect();
            Table {
                statistic,
                columns: header,
                rows,
                cohort_size,
            }
        }
    }
}

#[allow(clippy::panic)]
fn unreachable_numeric_or_tabulated() -> ! {
    panic!("histograms and crosstabs are evaluated before the cohort is built")
}

/// Rows per thread below which one thread counts (spawning costs more than it saves).
const ROWS_PER_THREAD: usize = 1 << 16;

/// The filters of `bound` as per-code lookup tables, when every one is a category test on a
/// coded column (the common case); None when a numeric test needs the general path.
fn coded_filters<'a>(
    columns: &'a Columns,
    bound: &'a Bound,
) -> Option<Vec<(&'a [u16], &'a [bool])>> {
    bound
        .filters
        .iter()
        .map(|f| match (&f.pred, &columns.columns()[f.column].data) {
            (Pred::Codes(allowed), ColumnData::Coded { codes, .. }) => {
                Some((codes.as_slice(), allowed.as_slice()))
            }
            _ => None,
        })
        .collect()
}

/// Counts per combination of codes of the tabulated columns over the rows passing the
/// filters, flattened row-major — [`count_cells`] over [`Bound::cohort`] in one pass, without
/// materialising the cohort, and split over the machine's cores for large tables (each thread
/// counts a contiguous range; the counts are summed).
pub fn count_matching(columns: &Columns, bound: &Bound) -> Vec<u64> {
    let coded: Vec<&[u16]> = bound.tab.iter().map(|&i| dict_of(columns, i).1).collect();
    let widths: Vec<usize> = bound
        .tab
        .iter()
        .map(|&i| dict_of(columns, i).0.width())
        .collect();
    let cells: usize = widths.iter().product();
    let filters = coded_filters(columns, bound);
    let passes = |row: usize| -> bool {
        match &filters {
            Some(tables) => tables.iter().all(|(codes, allowed)| {
                allowed
                    .get(usize::from(codes[row]))
                    .copied()
                    .unwrap_or(false)
            }),
            None => bound.matches(columns, row),
        }
    };
    // (A branch-free variant that sends failing rows to a sink cell measured slower: the sink
    // counter's increments serialise.)
    let count = |range: std::ops::Range<usize>| -> Vec<u64> {
        let mut counts = vec![0u64; cells];
        match (coded.as_slice(), widths.as_slice()) {
            // The crosstab of two fields and the histogram, without the general loop.
            ([a, b], [_, wb]) => {
                for row in range.filter(|&r| passes(r)) {
                    counts[usize::from(a[row]) * wb + usize::from(b[row])] += 1;
                }
            }
            ([a], _) => {
                for row in range.filter(|&r| passes(r)) {
                    counts[usize::from(a[row])] += 1;
                }
            }
            _ => {
                for row in range.filter(|&r| passes(r)) {
                    let mut index = 0;
                    for (codes, width) in coded.iter().zip(&widths) {
                        index = index * width + usize::from(codes[row]);
                    }
                    counts[index] += 1;
                }
            }
        }
        counts
    };
    let rows = columns.len();
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(rows / ROWS_PER_THREAD)
        .max(1);
    if threads == 1 {
        return count(0..rows);
    }
    let chunk = rows.div_ceil(threads);
    std::thread::scope(|scope| {
        let parts: Vec<_> = (0..threads)
            .map(|t| {
                let range = (t * chunk).min(rows)..((t + 1) * chunk).min(rows);
                scope.spawn(move || count(range))
            })
            .collect();
        let mut total = vec![0u64; cells];
        for part in parts {
            // A counting thread cannot panic (indices are in range by construction); if one
            // did, its share would be missing, so fall back to counting on this thread.
            match part.join() {
                Ok(counts) => {
                    for (t, c) in total.iter_mut().zip(counts) {
                        *t += c;
                    }
                }
                Err(_) => return count(0..rows),
            }
        }
        total
    })
}

/// Counts per combination of codes of `tab` columns, flattened row-major.
pub fn count_cells(columns: &Columns, tab: &[usize], cohort: &[usize]) -> Vec<u64> {
    let coded: Vec<(&Dict, &[u16])> = tab.iter().map(|&i| dict_of(columns, i)).collect();
    let widths: Vec<usize> = coded.iter().map(|(d, _)| d.width()).collect();
    let mut counts = vec![0u64; widths.iter().product()];
    for &row in cohort {
        let mut index = 0;
        for ((_, codes), width) in coded.iter().zip(&widths) {
            index = index * width + usize::from(codes[row]);
        }
        counts[index] += 1;
    }
    counts
}

/// Lays out flattened counts as a table: the last tabulated field across, the others down.
pub fn contingency_table(
    columns: &Columns,
    tab: &[usize],
    counts: &[u64],
    normalize: Normalize,
    statistic: String,
    cohort_size: u64,
) -> Table {
    let dicts: Vec<&Dict> = tab.iter().map(|&i| dict_of(columns, i).0).collect();
    let widths: Vec<usize> = dicts.iter().map(|d| d.width()).collect();
    let (across, down) = dicts.split_last().unwrap_or_else(|| unreachable_numeric());
    let across_width = widths[widths.len() - 1];
    // Which codes occur as missing per dimension.
    let mut missing_seen = vec![false; dicts.len()];
    for (flat, &n) in counts.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let mut rest = flat;
        for d in (0..dicts.len()).rev() {
            if rest % widths[d] == 0 {
                missing_seen[d] = true;
            }
            rest /= widths[d];
        }
    }
    let across_codes = shown_codes(across, missing_seen[dicts.len() - 1]);
    // Row keys: the cartesian product of the down dimensions.
    let mut row_keys: Vec<Vec<u16>> = vec![Vec::new()];
    for (d, dict) in down.iter().enumerate() {
        let codes = shown_codes(dict, missing_seen[d]);
        row_keys = row_keys
            .into_iter()
            .flat_map(|prefix| {
                codes.iter().map(move |&c| {
                    let mut key = prefix.clone();
                    key.push(c);
                    key
                })
            })
            .collect();
    }
    let cell = |key: &[u16], c: u16| -> u64 {
        let mut index = 0;
        for (d, &k) in key.iter().enumerate() {
            index = index * widths[d] + usize::from(k);
        }
        counts[index * across_width + usize::from(c)]
    };
    let row_totals: Vec<u64> = row_keys
        .iter()
        .map(|k| across_codes.iter().map(|&c| cell(k, c)).sum())
        .collect();
    let column_totals: Vec<u64> = across_codes
        .iter()
        .map(|&c| row_keys.iter().map(|k| cell(k, c)).sum())
        .collect();
    let grand: u64 = row_totals.iter().sum();
    let ratio = |n: u64, d: u64| {
        if d == 0 {
            TableCell::Empty
        } else {
            TableCell::Number(n as f64 / d as f64)
        }
    };
    let mut header: Vec<String> = tab[..tab.len() - 1]
        .iter()
        .map(|&i| columns.columns()[i].name.to_string())
        .collect();
    let across_name = columns.columns()[tab[tab.len() - 1]].name.as_str();
    if header.is_empty() {
        // A histogram without `by`: one row per category.
        let mut rows = Vec::new();
        for (j, &c) in across_codes.iter().enumerate() {
            let n = column_totals[j];
            rows.push(vec![
                TableCell::Text(label(across, c)),
                match normalize {
                    Normalize::None => TableCell::Count(n),
                    _ => ratio(n, grand),
                },
            ]);
        }
        return Table {
            statistic,
            columns: vec![
                across_name.to_string(),
                if normalize == Normalize::None {
                    "count"
                } else {
                    "share"
                }
                .to_string(),
            ],
            rows,
            cohort_size,
        };
    }
    header.extend(
        across_codes
            .iter()
            .map(|&c| format!("{across_name}={}", label(across, c))),
    );
    header.push("total".into());
    let mut rows = Vec::new();
    for (i, key) in row_keys.iter().enumerate() {
        if row_totals[i] == 0 && key.contains(&0) {
            continue;
        }
        let mut row: Vec<TableCell> = key
            .iter()
            .enumerate()
            .map(|(d, &k)| TableCell::Text(label(down[d], k)))
            .collect();
        for (j, &c) in across_codes.iter().enumerate() {
            let n = cell(key, c);
            row.push(match normalize {
                Normalize::None => TableCell::Count(n),
                Normalize::Row => ratio(n, row_totals[i]),
                Normalize::Column => ratio(n, column_totals[j]),
                Normalize::All => ratio(n, grand),
            });
        }
        row.push(match normalize {
            Normalize::None => TableCell::Count(row_totals[i]),
            Normalize::Row => ratio(row_totals[i], row_totals[i]),
            Normalize::Column | Normalize::All => ratio(row_totals[i], grand),
        });
        rows.push(row);
    }
    Table {
        statistic,
        columns: header,
        rows,
        cohort_size,
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    // Linear interpolation between closest ranks (numpy's default, pandas' `quantile`).
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// The non-missing values of the bound numeric column per group (one unnamed group without `by`).
fn numeric_groups(
    columns: &Columns,
    bound: &Bound,
    cohort: &[usize],
) -> Vec<(Option<String>, Vec<f64>)> {
    let index = bound.numeric.unwrap_or_else(|| unreachable_numeric());
    let ColumnData::Numeric(values) = &columns.columns()[index].data else {
        unreachable_numeric()
    };
    let groups: Vec<(Option<String>, Vec<f64>)> = match bound.by {
        None => vec![(
            None,
            cohort
                .iter()
                .map(|&r| f64::from(values[r]))
                .filter(|v| !v.is_nan())
                .collect(),
        )],
        Some(by) => {
            let (dict, codes) = dict_of(columns, by);
            let mut per: Vec<Vec<f64>> = vec![Vec::new(); dict.width()];
            for &r in cohort {
                let v = f64::from(values[r]);
                if !v.is_nan() {
                    per[usize::from(codes[r])].push(v);
                }
            }
            let present_missing = !per[0].is_empty();
            shown_codes(dict, present_missing)
                .into_iter()
                .map(|c| {
                    (
                        Some(label(dict, c)),
                        std::mem::take(&mut per[usize::from(c)]),
                    )
                })
                .collect()
        }
    };
    groups
}

fn summary(
    columns: &Columns,
    bound: &Bound,
    cohort: &[usize],
    statistic: String,
    cohort_size: u64,
) -> Table {
    let groups = numeric_groups(columns, bound, cohort);
    let mut header: Vec<String> = Vec::new();
    if let Some(by) = bound.by {
        header.push(columns.columns()[by].name.to_string());
    }
    header.extend(
        ["n", "mean", "std", "min", "q25", "median", "q75", "max"]
            .iter()
            .map(|s| s.to_string()),
    );
    let rows = groups
        .into_iter()
        .map(|(group, mut v)| {
            v.sort_by(f64::total_cmp);
            let n = v.len();
            let mean = v.iter().sum::<f64>() / n as f64;
            // Sample standard deviation (ddof = 1), as pandas reports it.
            let std = if n > 1 {
                (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
            } else {
                f64::NAN
            };
            let num = |x: f64| {
                if x.is_nan() {
                    TableCell::Empty
                } else {
                    TableCell::Number(x)
                }
            };
            let mut row = Vec::new();
            if let Some(g) = group {
                row.push(TableCell::Text(g));
            }
            row.push(TableCell::Count(n as u64));
            row.extend([
                num(mean),
                num(std),
                num(v.first().copied().unwrap_or(f64::NAN)),
                num(quantile(&v, 0.25)),
                num(quantile(&v, 0.5)),
                num(quantile(&v, 0.75)),
                num(v.last().copied().unwrap_or(f64::NAN)),
            ]);
            row
        })
        .collect();
    Table {
        statistic,
        columns: header,
        rows,
        cohort_size,
    }
}
