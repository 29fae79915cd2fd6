//! Functions whose answer can be far larger than their arguments, bounded.
//!
//! A few built-in functions make a value of a size the caller chooses with a number:
//! `repeat('x', 100000000000)` is 40 bytes of SQL and 100 GB of memory, allocated
//! before any memory pool sees it (scalar functions are not accounted), and it runs
//! wherever the expression is evaluated: while a coordinator folds constants at
//! planning, in its merge, or at a data owner asked by a coordinator that is not
//! honest. Each such function is replaced in every session fedgate builds by a
//! wrapper that estimates, from the arguments, how many bytes the call would make and
//! refuses the call (the query fails as too large) beyond [`MAX_CALL_BYTES`], before
//! the function runs. Everything else about the function (name, signature, how it is
//! written into a member's SQL) is the original's, except simplification: a
//! simplified call is built on the original function, which would drop the bound.
//!
//! The list is of functions whose output is not bounded by a small multiple of their
//! inputs (a count, a length or a range chosen by the caller), and of those taking
//! any number of arguments (`concat(s, s, ..., s)`), whose output is the sum of them.
//! Functions that return at most a small constant factor of their input are not
//! wrapped. A DataFusion upgrade must be reviewed against this list: the test beside
//! this module fails when a listed function no longer exists under its name.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray};
use datafusion::arrow::compute::kernels::length::length;
use datafusion::arrow::compute::{cast, cast_with_options};
use datafusion::arrow::datatypes::{
    DataType, FieldRef, Int64Type, IntervalMonthDayNanoType, TimeUnit,
};
use datafusion::common::{Result as DfResult, ScalarValue};
use datafusion::execution::FunctionRegistry;
use datafusion::logical_expr::{
    ColumnarValue, Documentation, Expr, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature,
};
use datafusion::prelude::SessionContext;

use crate::error::Error;

/// The most bytes one call of a bounded function may make, over all rows of the
/// batch it runs on.
pub const MAX_CALL_BYTES: u128 = 128 << 20;

/// How a function's output size follows from its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Growth {
    /// `repeat(text, n)`: the text's length times n.
    Repeat,
    /// `lpad/rpad(text, n[, fill])`: n characters of up to 4 bytes, or the text.
    Pad,
    /// `replace(text, from, to)`: every occurrence of `from` may become `to`.
    Replace,
    /// `regexp_replace(text, pattern, replacement[, flags])`: every match (at most
    /// one per position, empty ones included) may become the replacement, whose group
    /// references may copy the whole text.
    RegexpReplace,
    /// `array_repeat(value, n)`: n copies of the value.
    ArrayRepeat,
    /// `range/generate_series(start, stop[, step])`: one element per step.
    Range,
    /// `array_resize(list, n[, value])`: n elements.
    Resize,
    /// Any number of arguments, the output about their sum.
    Sum,
    /// `concat_ws(separator, ...)`: the arguments and a separator between each two.
    Join,
    /// `array_to_string(list, delimiter[, null_text])`: the delimiter per element.
    ListToText,
    /// `array_replace_all/array_replace_n(list, from, to[, n])`: any element may
    /// become `to`.
    ListReplace,
}

/// The functions bounded, by name (aliases are the original's).
const BOUNDED: &[(&str, Growth)] = &[
    ("repeat", Growth::Repeat),
    ("lpad", Growth::Pad),
    ("rpad", Growth::Pad),
    ("replace", Growth::Replace),
    ("regexp_replace", Growth::RegexpReplace),
    ("array_repeat", Growth::ArrayRepeat),
    ("range", Growth::Range),
    ("generate_series", Growth::Range),
    ("array_resize", Growth::Resize),
    ("concat", Growth::Sum),
    ("concat_ws", Growth::Join),
    ("array_to_string", Growth::ListToText),
    ("array_replace_all", Growth::ListReplace),
    ("array_replace_n", Growth::ListReplace),
    ("array_concat", Growth::Sum),
    ("make_array", Growth::Sum),
];

/// Replaces the bounded functions registered in `ctx` by their bounded wrappers.
/// Functions the context does not have are skipped (a catalog session may have
/// fewer).
pub fn bound_functions(ctx: &SessionContext) {
    for (name, growth) in BOUNDED {
        if let Ok(udf) = ctx.udf(name) {
            ctx.register_udf(ScalarUDF::new_from_impl(Bounded {
                inner: udf,
                growth: *growth,
            }));
        }
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Bounded {
    inner: Arc<ScalarUDF>,
    growth: Growth,
}

/// One argument, read row by row without copying its values.
enum Arg<'a> {
    Scalar(&'a ScalarValue),
    Array(&'a ArrayRef),
}

impl<'a> Arg<'a> {
    fn of(v: &'a ColumnarValue) -> Arg<'a> {
        match v {
            ColumnarValue::Scalar(s) => Arg::Scalar(s),
            ColumnarValue::Array(a) => Arg::Array(a),
        }
    }

    /// `of_array` row by row: over the array, or once over the scalar (as an array of
    /// one row) for every row; `fallback` where the scalar cannot be read.
    fn per_row<T: Clone>(
        &self,
        rows: usize,
        fallback: T,
        of_array: impl Fn(&ArrayRef) -> Vec<T>,
    ) -> Vec<T> {
        match self {
            Arg::Scalar(s) => {
                let one = s
                    .to_array_of_size(1)
                    .ok()
                    .and_then(|a| of_array(&a).into_iter().next())
                    .unwrap_or(fallback);
                vec![one; rows]
            }
            Arg::Array(a) => of_array(a),
        }
    }

    /// Bytes of the argument over `rows` rows.
    fn bytes(&self, rows: usize) -> u128 {
        match self {
            Arg::Scalar(s) => s.size() as u128 * rows as u128,
            Arg::Array(a) => a.get_array_memory_size() as u128,
        }
    }

    /// Per-row sizes in bytes: the byte length of a text or binary value, the size
    /// of any other value (a list's with all its elements).
    fn lengths(&self, rows: usize) -> Vec<u128> {
        let of_array = |a: &ArrayRef| -> Vec<u128> {
            let texty = matches!(
                a.data_type(),
                DataType::Utf8
                    | DataType::LargeUtf8
                    | DataType::Utf8View
                    | DataType::Binary
                    | DataType::LargeBinary
                    | DataType::BinaryView
            );
            if texty && let Some(l) = lengths_of(a) {
                return l;
            }
            // Any other type (lists, dictionaries, structs): each row's own value. A
            // row that cannot be read counts as the whole array.
            let whole = a.get_array_memory_size() as u128;
            (0..a.len())
                .map(|i| {
                    ScalarValue::try_from_array(a, i)
                        .map(|v| v.size() as u128)
                        .unwrap_or(whole)
                })
                .collect()
        };
        let fallback = match self {
            Arg::Scalar(s) => s.size() as u128,
            Arg::Array(_) => 0,
        };
        self.per_row(rows, fallback, of_array)
    }

    /// Per-row element counts of a list argument (0 for anything else).
    fn elements(&self, rows: usize) -> Vec<u128> {
        let of_array = |a: &ArrayRef| -> Vec<u128> {
            let listy = matches!(
                a.data_type(),
                DataType::List(_)
                    | DataType::LargeList(_)
                    | DataType::FixedSizeList(..)
                    | DataType::ListView(_)
                    | DataType::LargeListView(_)
            );
            match listy.then(|| lengths_of(a)).flatten() {
                Some(l) => l,
                None => vec![0; a.len()],
            }
        };
        self.per_row(rows, 0, of_array)
    }

    /// The text of a scalar text argument.
    fn text(&self) -> Option<&str> {
        match self {
            Arg::Scalar(s) => s.try_as_str().flatten(),
            Arg::Array(_) => None,
        }
    }

    /// Per-row integer values (dates in days, timestamps in their unit); `None`
    /// where the value is null or not a number.
    fn integers(&self, rows: usize) -> Vec<Option<i128>> {
        let of_array = |a: &ArrayRef| -> Vec<Option<i128>> {
            // Dates are counted in days: Date32 holds days, Date64 milliseconds.
            let (through, per) = match a.data_type() {
                DataType::Date32 => (cast(a, &DataType::Int32).ok(), 1),
                DataType::Date64 => (cast(a, &DataType::Int64).ok(), 86_400_000),
                _ => (Some(a.clone()), 1),
            };
            let opts = datafusion::arrow::compute::CastOptions {
                safe: true,
                ..Default::default()
            };
            match through.and_then(|t| cast_with_options(&t, &DataType::Int64, &opts).ok()) {
                Some(c) => c
                    .as_primitive::<Int64Type>()
                    .iter()
                    .map(|v| v.map(|n| i128::from(n) / per))
                    .collect(),
                None => vec![None; a.len()],
            }
        };
        self.per_row(rows, None, of_array)
    }

    /// Per-row steps of a `range` given as an interval: in days for dates, in
    /// nanoseconds for timestamps, a month counted as 28 days so that the number of
    /// steps is overestimated. A step of 0 means one that may never advance (zero, or
    /// parts of mixed signs: `1 month -28 days` returns to where it started after
    /// February) and makes the estimate unbounded.
    fn steps_in(&self, rows: usize, of: &DataType) -> Vec<Option<i128>> {
        const DAY_NS: i128 = 86_400_000_000_000;
        let timestamps = matches!(of, DataType::Timestamp(..));
        let of_array = |a: &ArrayRef| -> Vec<Option<i128>> {
            let unit = DataType::Interval(datafusion::arrow::datatypes::IntervalUnit::MonthDayNano);
            match cast(a, &unit) {
                Ok(c) => c
                    .as_primitive::<IntervalMonthDayNanoType>()
                    .iter()
                    .map(|v| {
                        v.map(|i| {
                            let parts = [i.months as i128, i.days as i128, i.nanoseconds as i128];
                            let mixed =
                                parts.iter().any(|p| *p > 0) && parts.iter().any(|p| *p < 0);
                            let days = parts[0] * 28 + parts[1];
                            let step = if timestamps {
                                days * DAY_NS + parts[2]
                            } else {
                                days + parts[2] / DAY_NS
                            };
                            if mixed { 0 } else { step }
                        })
                    })
                    .collect(),
                Err(_) => vec![Some(0); a.len()],
            }
        };
        // A scalar step that cannot be read counts as one that may never advance.
        self.per_row(rows, Some(0), of_array)
    }
}

/// Arrow's `length` of every row (bytes of a text, elements of a list), nulls as 0.
fn lengths_of(a: &ArrayRef) -> Option<Vec<u128>> {
    let l = cast(&length(a).ok()?, &DataType::Int64).ok()?;
    Some(
        l.as_primitive::<Int64Type>()
            .iter()
            .map(|v| v.unwrap_or(0).max(0) as u128)
            .collect(),
    )
}

/// Bytes one call would make, estimated from above.
fn estimate(growth: Growth, args: &[ColumnarValue], rows: usize) -> u128 {
    let a: Vec<Arg> = args.iter().map(Arg::of).collect();
    let zero = || vec![0u128; rows];
    let n_or = |i: usize| -> Vec<u128> {
        a.get(i)
            .map(|x| {
                x.integers(rows)
                    .into_iter()
                    .map(|v| v.unwrap_or(0).max(0) as u128)
                    .collect()
            })
            .unwrap_or_else(zero)
    };
    let len_or = |i: usize| a.get(i).map(|x| x.lengths(rows)).unwrap_or_else(zero);
    let per_row: Vec<u128> = match growth {
        Growth::Sum => return a.iter().map(|x| x.bytes(rows)).sum(),
        Growth::Join => {
            // The separator between every two of the other arguments.
            let others = a.len().saturating_sub(1) as u128;
            let sep = a.first().map(|x| x.bytes(rows)).unwrap_or(0);
            return a.iter().map(|x| x.bytes(rows)).sum::<u128>()
                + sep.saturating_mul(others.saturating_sub(1));
        }
        Growth::ListToText | Growth::ListReplace => {
            // Per element: the delimiter and the null text (array_to_string), or the
            // replacement any element may become (array_replace_all/_n).
            let per_element: Vec<u128> = if growth == Growth::ListToText {
                len_or(1)
                    .iter()
                    .zip(len_or(2))
                    .map(|(d, n)| d + n)
                    .collect()
            } else {
                len_or(2).iter().map(|to| (*to).max(8)).collect()
            };
            let list = a.first();
            let elements = list.map(|x| x.elements(rows)).unwrap_or_else(zero);
            let whole = list.map(|x| x.bytes(rows)).unwrap_or(0);
            return (0..rows).fold(whole, |t, i| {
                t.saturating_add(elements[i].saturating_mul(per_element[i]))
            });
        }
        Growth::Repeat => {
            let (text, n) = (len_or(0), n_or(1));
            text.iter()
                .zip(&n)
                .map(|(t, n)| t.saturating_mul(*n))
                .collect()
        }
        Growth::Pad => {
            let (text, n) = (len_or(0), n_or(1));
            text.iter()
                .zip(&n)
                .map(|(t, n)| (*t).max(n.saturating_mul(4)))
                .collect()
        }
        Growth::Replace => {
            let (text, from, to) = (len_or(0), len_or(1), len_or(2));
            (0..rows)
                .map(|i| {
                    let hits = text[i] / from[i].max(1);
                    text[i] + hits.saturating_mul(to[i])
                })
                .collect()
        }
        Growth::RegexpReplace => {
            let (text, repl) = (len_or(0), len_or(2));
            // Group references (`\1`, `${1}`) copy at most the whole text each; every
            // match (one without the `g` flag, else up to one per position) gets the
            // replacement's own text.
            let refs = match a.get(2).and_then(|r| r.text()) {
                Some(r) => r.chars().filter(|c| *c == '\\' || *c == '$').count() as u128,
                None => u128::MAX,
            };
            let global = match a.get(3) {
                None => false,
                Some(f) => f.text().is_none_or(|f| f.contains('g')),
            };
            (0..rows)
                .map(|i| {
                    let matches = if global { text[i] + 1 } else { 1 };
                    let refs = refs.min(repl[i]);
                    text[i]
                        .saturating_add(matches.saturating_mul(repl[i]))
                        .saturating_add(refs.saturating_mul(text[i]))
                })
                .collect()
        }
        Growth::ArrayRepeat => {
            let (value, n) = (len_or(0), n_or(1));
            value
                .iter()
                .zip(&n)
                .map(|(v, n)| (*v).max(8).saturating_mul(*n))
                .collect()
        }
        Growth::Resize => {
            let (list, n) = (len_or(0), n_or(1));
            let value = if a.len() > 2 {
                len_or(2)
            } else {
                vec![8; rows]
            };
            (0..rows)
                .map(|i| list[i].saturating_add(n[i].saturating_mul(value[i].max(8))))
                .collect()
        }
        Growth::Range => {
            let unit = args
                .first()
                .map(|v| v.data_type())
                .unwrap_or(DataType::Int64);
            // Timestamps are stepped in nanoseconds whatever their unit.
            let scale: i128 = match unit {
                DataType::Timestamp(TimeUnit::Second, _) => 1_000_000_000,
                DataType::Timestamp(TimeUnit::Millisecond, _) => 1_000_000,
                DataType::Timestamp(TimeUnit::Microsecond, _) => 1_000,
                _ => 1,
            };
            let scaled = |v: Vec<Option<i128>>| -> Vec<Option<i128>> {
                v.into_iter().map(|x| x.map(|x| x * scale)).collect()
            };
            // One argument: range(stop) from 0.
            let (start, stop, step_arg) = match a.len() {
                1 => (vec![Some(0); rows], a[0].integers(rows), None),
                _ => (
                    scaled(a[0].integers(rows)),
                    scaled(a[1].integers(rows)),
                    a.get(2),
                ),
            };
            let step = match step_arg {
                Some(s) if matches!(s_type(s), DataType::Interval(_)) => s.steps_in(rows, &unit),
                Some(s) => s.integers(rows),
                None => vec![Some(1); rows],
            };
            (0..rows)
                .map(|i| match (start[i], stop[i], step[i]) {
                    (Some(_), Some(_), Some(0)) => u128::MAX,
                    (Some(lo), Some(hi), step) => {
                        let step = step.unwrap_or(1).unsigned_abs().max(1);
                        ((hi - lo).unsigned_abs() / step + 1).saturating_mul(8)
                    }
                    _ => 0,
                })
                .collect()
        }
    };
    per_row.iter().fold(0u128, |t, b| t.saturating_add(*b))
}

fn s_type(a: &Arg) -> DataType {
    match a {
        Arg::Scalar(s) => s.data_type(),
        Arg::Array(a) => a.data_type().clone(),
    }
}

impl Bounded {
    fn check(&self, args: &ScalarFunctionArgs) -> DfResult<()> {
        let bytes = estimate(self.growth, &args.args, args.number_rows);
        if bytes > MAX_CALL_BYTES {
            return Err(Error::TooLarge(format!(
                "{}(...) would make about {} MiB, more than the {} MiB one call may make here",
                self.inner.name(),
                bytes >> 20,
                MAX_CALL_BYTES >> 20
            ))
            .into_datafusion());
        }
        Ok(())
    }
}

impl ScalarUDFImpl for Bounded {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn schema_name(&self, args: &[Expr]) -> DfResult<String> {
        self.inner.inner().schema_name(args)
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> DfResult<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> DfResult<FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn is_strict(&self) -> bool {
        self.inner.inner().is_strict()
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        self.check(&args)?;
        self.inner.invoke_with_args(args)
    }

    fn short_circuits(&self) -> bool {
        self.inner.short_circuits()
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> DfResult<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }
}

/// The most bytes of text and binary constants the expressions of a plan's
/// projections, aggregates and windows may hold together. Such a constant is copied
/// into every row those operators make (`SELECT '<1 MiB of text>' FROM census` makes
/// 8 GiB per batch of 8,192 rows), so the sum bounds what one batch can take however
/// the constants were written or folded. Constants in filters and joins are compared,
/// not copied, and do not count.
pub const MAX_PROJECTED_CONSTANT_BYTES: usize = 64 << 10;

/// An optimizer rule that changes nothing and refuses a plan whose projected
/// constants exceed [`MAX_PROJECTED_CONSTANT_BYTES`]. It runs last, after constants
/// are folded.
#[derive(Debug, Default)]
pub struct ProjectedConstants;

impl datafusion::optimizer::OptimizerRule for ProjectedConstants {
    fn name(&self) -> &str {
        "fedgate_projected_constants"
    }

    fn rewrite(
        &self,
        plan: datafusion::logical_expr::LogicalPlan,
        _config: &dyn datafusion::optimizer::OptimizerConfig,
    ) -> DfResult<datafusion::common::tree_node::Transformed<datafusion::logical_expr::LogicalPlan>>
    {
        check_projected_constants(&plan)?;
        Ok(datafusion::common::tree_node::Transformed::no(plan))
    }
}

/// Refuses a plan whose projected constants exceed [`MAX_PROJECTED_CONSTANT_BYTES`]
/// (what [`ProjectedConstants`] checks, for a plan made without the optimizer).
pub fn check_projected_constants(plan: &datafusion::logical_expr::LogicalPlan) -> DfResult<()> {
    let bytes = projected_constant_bytes(plan)?;
    if bytes > MAX_PROJECTED_CONSTANT_BYTES {
        return Err(Error::TooLarge(format!(
            "the query's output columns hold {} KiB of constant text, more than the {} KiB \
             a query may copy into every row it makes",
            bytes >> 10,
            MAX_PROJECTED_CONSTANT_BYTES >> 10
        ))
        .into_datafusion());
    }
    Ok(())
}

/// The bytes of a text or binary constant's value; `None` for a constant of another
/// type (or a null).
pub fn literal_text_bytes(v: &ScalarValue) -> Option<usize> {
    match v {
        ScalarValue::Utf8(Some(s))
        | ScalarValue::LargeUtf8(Some(s))
        | ScalarValue::Utf8View(Some(s)) => Some(s.len()),
        ScalarValue::Binary(Some(b))
        | ScalarValue::LargeBinary(Some(b))
        | ScalarValue::BinaryView(Some(b)) => Some(b.len()),
        _ => None,
    }
}

/// Bytes of text and binary constants in the expressions of the plan's projections,
/// aggregates and windows (subqueries included).
fn projected_constant_bytes(plan: &datafusion::logical_expr::LogicalPlan) -> DfResult<usize> {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    use datafusion::logical_expr::LogicalPlan as P;
    let mut total = 0usize;
    plan.apply_with_subqueries(|node| {
        if matches!(node, P::Projection(_) | P::Aggregate(_) | P::Window(_)) {
            node.apply_expressions(|e| {
                e.apply(|x| {
                    if let Expr::Literal(v, _) = x {
                        total =
                            total.saturating_add(literal_text_bytes(v).unwrap_or_else(|| v.size()));
                    }
                    Ok(TreeNodeRecursion::Continue)
                })
            })?;
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member's context, which has the bounded functions.
    fn ctx() -> SessionContext {
        crate::owner::session::member_context()
    }

    async fn run(ctx: &SessionContext, sql: &str) -> std::result::Result<usize, Error> {
        let df = ctx.sql(sql).await.map_err(Error::from_datafusion)?;
        let batches = df.collect().await.map_err(Error::from_datafusion)?;
        Ok(batches.iter().map(|b| b.num_rows()).sum())
    }

    /// Constants copied into every row are bounded in sum, however they were written
    /// or folded; constants that are only compared are not.
    #[tokio::test]
    async fn constants_copied_into_every_row_are_bounded() {
        let ctx = ctx();
        let big = "x".repeat(40_000);
        for sql in [
            format!("SELECT '{big}' AS a, '{big}' AS b"),
            "SELECT repeat('x', 100000000) AS a".to_string(),
            format!("SELECT concat(v, '{big}{big}') FROM (VALUES ('a')) t(v)"),
            format!("SELECT max('{big}{big}') FROM (VALUES ('a')) t(v)"),
        ] {
            match run(&ctx, &sql).await {
                Err(Error::TooLarge(m)) => assert!(m.contains("every row"), "{m}"),
                other => panic!("{}: {other:?}", &sql[..60.min(sql.len())]),
            }
        }
        for sql in [
            format!("SELECT '{big}' AS a"),
            format!("SELECT v FROM (VALUES ('a')) t(v) WHERE v <> '{big}{big}{big}'"),
        ] {
            assert_eq!(run(&ctx, &sql).await.unwrap(), 1);
        }
    }

    /// Every bounded function exists under its name in the sessions fedgate builds
    /// (a DataFusion upgrade that renames one fails here, and is reviewed).
    #[test]
    fn every_bounded_function_exists() {
        let ctx = SessionContext::new();
        for (name, _) in BOUNDED {
            assert!(ctx.udf(name).is_ok(), "{name} is not registered");
        }
    }

    /// Calls asking for more than a call may make are refused before they run, as
    /// constants and over rows; ordinary calls answer as before.
    #[tokio::test]
    async fn huge_values_are_refused_and_ordinary_ones_answer() {
        let ctx = ctx();
        for sql in [
            "SELECT repeat('x', 100000000000)",
            "SELECT length(repeat('abc', 2000000000))",
            "SELECT lpad('a', 1000000000)",
            "SELECT rpad('a', 1000000000, 'xy')",
            "SELECT replace(repeat('a', 100000), 'a', repeat('b', 100000))",
            "SELECT regexp_replace(repeat('a', 20000), '', repeat('b', 20000), 'g')",
            "SELECT array_repeat(1, 1000000000)",
            "SELECT cardinality(range(1, 10000000000))",
            "SELECT generate_series(TIMESTAMP '2000-01-01 00:00:00', TIMESTAMP '2100-01-01 00:00:00', INTERVAL '1 second')",
            "SELECT array_resize(make_array(1), 1000000000)",
            "SELECT length(repeat(v, 100000000)) FROM (VALUES ('aaaa'), ('bb')) t(v)",
            "SELECT repeat('a', n) FROM (VALUES (1), (200000000)) t(n)",
            // A step that returns to where it started after February.
            "SELECT generate_series(DATE '2001-02-01', DATE '2001-01-01', INTERVAL '1 month -28 days')",
            // Timestamps in seconds stepped by a nanosecond.
            "SELECT generate_series(to_timestamp_seconds('2001-01-01T00:00:00'), \
             to_timestamp_seconds('2001-01-01T00:01:00'), INTERVAL '1 nanosecond')",
            // Lists are as large as their elements, not as their count.
            "SELECT array_repeat(make_array(repeat('x', 10000000)), 1000)",
            "SELECT array_resize(make_array(repeat('x', 10000000)), 1000, repeat('y', 10000000))",
            // The separator between every two arguments.
            "SELECT concat_ws(repeat('x', 10000000), '', '', '', '', '', '', '', '', '', '', '', '', '', '', '')",
            // A delimiter per element.
            "SELECT array_to_string(array_repeat('', 100000), repeat('x', 10000))",
            "SELECT array_replace_all(array_repeat('a', 100000), 'a', repeat('b', 10000))",
        ] {
            match run(&ctx, sql).await {
                // Refused by the call's bound, or, where a part was folded into a
                // large constant first, by the bound on constants copied per row.
                Err(Error::TooLarge(m)) => assert!(
                    m.contains("one call may make") || m.contains("every row"),
                    "{sql}: {m}"
                ),
                other => panic!("{sql}: {other:?}"),
            }
        }
        for (sql, rows) in [
            (
                "SELECT repeat('ab', 1000), lpad('7', 5, '0'), rpad('7', 5)",
                1,
            ),
            (
                "SELECT replace('a-b-c', '-', '+'), regexp_replace('a1b22', '[0-9]+', 'n', 'g')",
                1,
            ),
            (
                "SELECT array_repeat('x', 3), range(1, 10), generate_series(1, 5)",
                1,
            ),
            (
                "SELECT generate_series(DATE '2026-01-01', DATE '2026-12-31', INTERVAL '1 day')",
                1,
            ),
            (
                "SELECT array_resize(make_array(1, 2), 10, 0), concat('a', 'b'), concat_ws('-', 'a', 'b')",
                1,
            ),
            (
                "SELECT repeat(v, n) FROM (VALUES ('a', 3), ('bb', 2), (NULL, 1)) t(v, n)",
                3,
            ),
        ] {
            let got = run(&ctx, sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            assert_eq!(got, rows, "{sql}");
        }
    }
}
