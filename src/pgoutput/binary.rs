//! Rendering values in PostgreSQL's binary send form (pgoutput `binary 'true'`, tuple kind
//! `b`) to the text PostgreSQL itself would print for them.
//!
//! Owns the binary layouts of the common built-in types (bool, integers, oid, floats,
//! numeric, the string types, bytea, uuid, date/time types, interval, json, jsonb, point,
//! enums) and of arrays of them, and their text output rules (`float8out`'s shortest-exact
//! digits, `numeric_out`'s dscale, `array_out`'s quoting). Date/time values print in ISO
//! style; `timestamptz` prints in UTC with `+00` (the session TimeZone of the walsender is
//! not known here). Intervals print in the `postgres` IntervalStyle.
//!
//! It must never panic on any bytes and never allocate from a length or count read from the
//! value before checking it against the bytes that remain. A type it does not know is an
//! error naming the type oid, so the caller can fall back to text mode.

use std::fmt::Write as _;

use super::types::Oid;

/// A binary value could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BinaryError {
    /// The type has no binary renderer here; capture this column in text mode instead.
    #[error("no binary renderer for type oid {0}; use text mode (binary 'false') for it")]
    Unsupported(Oid),
    /// The bytes are not a valid value of the type.
    #[error("invalid binary value for type oid {type_oid}: {what}")]
    Invalid {
        /// The type oid.
        type_oid: Oid,
        /// What was wrong.
        what: String,
    },
}

/// How a non-built-in type (oid ≥ 16384) is sent in binary form. pgoutput's Type message
/// gives only the name, so the [`RelationCache`](super::RelationCache) guesses: a name
/// starting with `_` is an array, anything else an enum (label bytes). Callers who know
/// better (from the catalog) say so with `RelationCache::set_user_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserType {
    /// An enum: the binary form is the label.
    Enum,
    /// An array type (its elements name their own type oid).
    Array,
    /// A domain: sent as its base type.
    Domain(Oid),
}

/// PostgreSQL's first oid for user-defined objects; lower oids are built in.
pub const FIRST_NORMAL_OBJECT_ID: Oid = 16384;

/// Built-in type oids with a renderer (from `pg_type.dat`).
#[allow(missing_docs)]
pub mod oids {
    use super::Oid;
    pub const BOOL: Oid = 16;
    pub const BYTEA: Oid = 17;
    pub const CHAR: Oid = 18;
    pub const NAME: Oid = 19;
    pub const INT8: Oid = 20;
    pub const INT2: Oid = 21;
    pub const INT4: Oid = 23;
    pub const TEXT: Oid = 25;
    pub const OID: Oid = 26;
    pub const JSON: Oid = 114;
    pub const POINT: Oid = 600;
    pub const FLOAT4: Oid = 700;
    pub const FLOAT8: Oid = 701;
    pub const UNKNOWN: Oid = 705;
    pub const BPCHAR: Oid = 1042;
    pub const VARCHAR: Oid = 1043;
    pub const DATE: Oid = 1082;
    pub const TIME: Oid = 1083;
    pub const TIMESTAMP: Oid = 1114;
    pub const TIMESTAMPTZ: Oid = 1184;
    pub const INTERVAL: Oid = 1186;
    pub const NUMERIC: Oid = 1700;
    pub const UUID: Oid = 2950;
    pub const JSONB: Oid = 3802;
    /// Array types of the above.
    pub const ARRAYS: &[Oid] = &[
        1000, 1001, 1002, 1003, 1016, 1005, 1007, 1009, 1028, 199, 1017, 1021, 1022, 1014, 1015,
        1182, 1183, 1115, 1185, 1187, 1231, 2951, 3807,
    ];
}

/// Looks up how a non-built-in type oid is sent; `None` when nothing is known about it.
pub trait UserTypes {
    /// The kind of user type `oid`, if known.
    fn user_type(&self, oid: Oid) -> Option<UserType>;
}

/// No user types known: non-built-in oids are rendered as enums.
pub struct NoUserTypes;

impl UserTypes for NoUserTypes {
    fn user_type(&self, _oid: Oid) -> Option<UserType> {
        None
    }
}

/// Renders one binary value of type `type_oid` to PostgreSQL's text output.
pub fn render(type_oid: Oid, data: &[u8], users: &dyn UserTypes) -> Result<String, BinaryError> {
    let mut out = String::new();
    render_into(type_oid, data, users, &mut out, 0)?;
    Ok(out)
}

fn invalid(type_oid: Oid, what: impl Into<String>) -> BinaryError {
    BinaryError::Invalid {
        type_oid,
        what: what.into(),
    }
}

fn fixed<const N: usize>(type_oid: Oid, data: &[u8]) -> Result<[u8; N], BinaryError> {
    data.try_into()
        .map_err(|_| invalid(type_oid, format!("expected {N} bytes, got {}", data.len())))
}

fn utf8(type_oid: Oid, data: &[u8]) -> Result<&str, BinaryError> {
    std::str::from_utf8(data).map_err(|e| invalid(type_oid, format!("not UTF-8: {e}")))
}

/// Domains may nest and arrays may hold arrays' elements; a bound keeps hostile catalogs
/// (a domain over itself) from recursing forever.
const MAX_DEPTH: u32 = 16;

fn render_into(
    type_oid: Oid,
    data: &[u8],
    users: &dyn UserTypes,
    out: &mut String,
    depth: u32,
) -> Result<(), BinaryError> {
    use oids::*;
    if depth > MAX_DEPTH {
        return Err(invalid(type_oid, "type nesting too deep"));
    }
    match type_oid {
        BOOL => {
            let [b] = fixed::<1>(type_oid, data)?;
            out.push(if b != 0 { 't' } else { 'f' });
        }
        INT2 => {
            let _ = write!(out, "{}", i16::from_be_bytes(fixed(type_oid, data)?));
        }
        INT4 => {
            let _ = write!(out, "{}", i32::from_be_bytes(fixed(type_oid, data)?));
        }
        INT8 => {
            let _ = write!(out, "{}", i64::from_be_bytes(fixed(type_oid, data)?));
        }
        OID => {
            let _ = write!(out, "{}", u32::from_be_bytes(fixed(type_oid, data)?));
        }
        FLOAT4 => float4_out(f32::from_be_bytes(fixed(type_oid, data)?), out),
        FLOAT8 => float8_out(f64::from_be_bytes(fixed(type_oid, data)?), out),
        NUMERIC => numeric_out(data, out)?,
        TEXT | VARCHAR | BPCHAR | NAME | JSON | UNKNOWN => out.push_str(utf8(type_oid, data)?),
        JSONB => match data.split_first() {
            Some((1, rest)) => out.push_str(utf8(type_oid, rest)?),
            Some((v, _)) => return Err(invalid(type_oid, format!("unknown jsonb version {v}"))),
            None => return Err(invalid(type_oid, "empty jsonb value")),
        },
        CHAR => match data {
            // An empty "char" is sent as one NUL byte.
            [] | [0] => {}
            [c] if c & 0x80 == 0 => out.push(char::from(*c)),
            // charout prints high-bit bytes as a backslash and three octal digits.
            [c] => {
                let _ = write!(out, "\\{:03o}", c);
            }
            _ => return Err(invalid(type_oid, "\"char\" value longer than 1 byte")),
        },
        BYTEA => {
            out.reserve(2 + data.len() * 2);
            out.push_str("\\x");
            for b in data {
                let _ = write!(out, "{b:02x}");
            }
        }
        UUID => {
            let b: [u8; 16] = fixed(type_oid, data)?;
            for (i, x) in b.iter().enumerate() {
                if matches!(i, 4 | 6 | 8 | 10) {
                    out.push('-');
                }
                let _ = write!(out, "{x:02x}");
            }
        }
        DATE => date_out(i32::from_be_bytes(fixed(type_oid, data)?), out),
        TIME => {
            let t = i64::from_be_bytes(fixed(type_oid, data)?);
            if !(0..=86_400_000_000).contains(&t) {
                return Err(invalid(type_oid, format!("time {t} µs out of range")));
            }
            time_out(t, out);
        }
        TIMESTAMP => timestamp_out(i64::from_be_bytes(fixed(type_oid, data)?), false, out),
        TIMESTAMPTZ => timestamp_out(i64::from_be_bytes(fixed(type_oid, data)?), true, out),
        INTERVAL => {
            let b: [u8; 16] = fixed(type_oid, data)?;
            let mut t = [0u8; 8];
            t.copy_from_slice(&b[..8]);
            let mut d = [0u8; 4];
            d.copy_from_slice(&b[8..12]);
            let mut m = [0u8; 4];
            m.copy_from_slice(&b[12..]);
            interval_out(
                i64::from_be_bytes(t),
                i32::from_be_bytes(d),
                i32::from_be_bytes(m),
                out,
            );
        }
        POINT => {
            let b: [u8; 16] = fixed(type_oid, data)?;
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[..8]);
            let mut y = [0u8; 8];
            y.copy_from_slice(&b[8..]);
            out.push('(');
            float8_out(f64::from_be_bytes(x), out);
            out.push(',');
            float8_out(f64::from_be_bytes(y), out);
            out.push(')');
        }
        o if oids::ARRAYS.contains(&o) => array_out(type_oid, data, users, out, depth)?,
        o if o >= FIRST_NORMAL_OBJECT_ID => match users.user_type(o) {
            Some(UserType::Array) => array_out(type_oid, data, users, out, depth)?,
            Some(UserType::Domain(base)) => render_into(base, data, users, out, depth + 1)?,
            Some(UserType::Enum) | None => out.push_str(utf8(type_oid, data)?),
        },
        o => return Err(BinaryError::Unsupported(o)),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// floats

/// `float8out` with `extra_float_digits` ≥ 1 (the default): the shortest digits that read
/// back exactly; fixed notation when the decimal exponent is in [-4, 15), else `1e+20`.
pub fn float8_out(v: f64, out: &mut String) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "Infinity" } else { "-Infinity" });
    } else {
        shortest_out(format!("{v:e}"), 15, || format!("{v}"), out);
    }
}

/// `float4out`: as [`float8_out`] with fixed notation for exponents in [-4, 6).
pub fn float4_out(v: f32, out: &mut String) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "Infinity" } else { "-Infinity" });
    } else {
        shortest_out(format!("{v:e}"), 6, || format!("{v}"), out);
    }
}

/// `sci` is Rust's shortest round-trip form in scientific notation (`-1.5e-7`); Rust's
/// `Display` gives the same digits in fixed notation.
fn shortest_out(sci: String, max_fixed_exp: i32, fixed: impl FnOnce() -> String, out: &mut String) {
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..max_fixed_exp).contains(&exp) {
        out.push_str(&fixed());
    } else {
        out.push_str(mantissa);
        out.push('e');
        out.push(if exp < 0 { '-' } else { '+' });
        let _ = write!(out, "{:02}", exp.unsigned_abs());
    }
}

// ---------------------------------------------------------------------------------------
// numeric

fn numeric_out(data: &[u8], out: &mut String) -> Result<(), BinaryError> {
    let t = oids::NUMERIC;
    if data.len() < 8 {
        return Err(invalid(
            t,
            format!("header needs 8 bytes, got {}", data.len()),
        ));
    }
    let rd = |i: usize| u16::from_be_bytes([data[i], data[i + 1]]);
    let ndigits = rd(0) as i16;
    let weight = rd(2) as i16;
    let sign = rd(4);
    let dscale = rd(6);
    match sign {
        0xC000 => {
            out.push_str("NaN");
            return Ok(());
        }
        0xD000 => {
            out.push_str("Infinity");
            return Ok(());
        }
        0xF000 => {
            out.push_str("-Infinity");
            return Ok(());
        }
        0x0000 | 0x4000 => {}
        s => return Err(invalid(t, format!("unknown sign word 0x{s:04x}"))),
    }
    if ndigits < 0 || data.len() != 8 + 2 * ndigits as usize {
        return Err(invalid(
            t,
            format!(
                "{ndigits} digits announced, {} bytes present",
                data.len() - 8
            ),
        ));
    }
    if dscale > 0x3FFF {
        return Err(invalid(t, format!("display scale {dscale} out of range")));
    }
    let mut digits = Vec::with_capacity(ndigits as usize);
    for i in 0..ndigits as usize {
        let d = rd(8 + 2 * i);
        if d >= 10000 {
            return Err(invalid(t, format!("base-10000 digit {d} out of range")));
        }
        digits.push(d);
    }
    let digit = |i: i32| -> u16 {
        usize::try_from(i)
            .ok()
            .and_then(|i| digits.get(i).copied())
            .unwrap_or(0)
    };
    if sign == 0x4000 {
        out.push('-');
    }
    // Integer part: digit groups 0..=weight (get_str_from_var).
    let weight = i32::from(weight);
    if weight < 0 {
        out.push('0');
    } else {
        for i in 0..=weight {
            let d = digit(i);
            if i == 0 {
                let _ = write!(out, "{d}");
            } else {
                let _ = write!(out, "{d:04}");
            }
        }
    }
    if dscale > 0 {
        out.push('.');
        let mut left = usize::from(dscale);
        let mut i = weight + 1;
        while left > 0 {
            let group = format!("{:04}", digit(i));
            let take = left.min(4);
            out.push_str(&group[..take]);
            left -= take;
            i += 1;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// dates and times

const USECS_PER_DAY: i64 = 86_400_000_000;
/// Days from 1970-01-01 to 2000-01-01.
const PG_EPOCH_DAYS: i64 = 10_957;

/// Proleptic Gregorian date of a day count from 1970-01-01 (Hinnant's `civil_from_days`),
/// as (astronomical year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Writes `YYYY-MM-DD` and returns whether the date is BC (the caller appends ` BC`).
fn ymd_out(days_since_2000: i64, out: &mut String) -> bool {
    let (y, m, d) = civil_from_days(days_since_2000 + PG_EPOCH_DAYS);
    // PostgreSQL has no year 0: astronomical year 0 is 1 BC.
    let (year, bc) = if y <= 0 { (1 - y, true) } else { (y, false) };
    let _ = write!(out, "{year:04}-{m:02}-{d:02}");
    bc
}

fn date_out(days: i32, out: &mut String) {
    match days {
        i32::MAX => out.push_str("infinity"),
        i32::MIN => out.push_str("-infinity"),
        d => {
            if ymd_out(i64::from(d), out) {
                out.push_str(" BC");
            }
        }
    }
}

/// `HH:MM:SS` plus the fraction with trailing zeros removed.
fn time_out(usecs: i64, out: &mut String) {
    let secs = usecs / 1_000_000;
    let frac = usecs % 1_000_000;
    let _ = write!(
        out,
        "{:02}:{:02}:{:02}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    );
    frac_out(frac, out);
}

fn frac_out(frac: i64, out: &mut String) {
    if frac != 0 {
        let s = format!("{frac:06}");
        out.push('.');
        out.push_str(s.trim_end_matches('0'));
    }
}

fn timestamp_out(usecs: i64, tz: bool, out: &mut String) {
    match usecs {
        i64::MAX => out.push_str("infinity"),
        i64::MIN => out.push_str("-infinity"),
        t => {
            let days = t.div_euclid(USECS_PER_DAY);
            let time = t.rem_euclid(USECS_PER_DAY);
            let bc = ymd_out(days, out);
            out.push(' ');
            time_out(time, out);
            if tz {
                out.push_str("+00");
            }
            if bc {
                out.push_str(" BC");
            }
        }
    }
}

/// `interval_out` in the `postgres` IntervalStyle (EncodeInterval, INTSTYLE_POSTGRES).
fn interval_out(time: i64, days: i32, months: i32, out: &mut String) {
    let mut is_before = false;
    let mut is_zero = true;
    let years = months / 12;
    let mons = months % 12;
    for (value, unit) in [(years, "year"), (mons, "mon"), (days, "day")] {
        if value == 0 {
            continue;
        }
        let _ = write!(
            out,
            "{}{}{} {}{}",
            if is_zero { "" } else { " " },
            if is_before && value > 0 { "+" } else { "" },
            value,
            unit,
            if value != 1 { "s" } else { "" }
        );
        is_before = value < 0;
        is_zero = false;
    }
    let hour = time / 3_600_000_000;
    let rem = time % 3_600_000_000;
    let min = rem / 60_000_000;
    let usec = rem % 60_000_000;
    if is_zero || hour != 0 || min != 0 || usec != 0 {
        let minus = hour < 0 || min < 0 || usec < 0;
        let _ = write!(
            out,
            "{}{}{:02}:{:02}:{:02}",
            if is_zero { "" } else { " " },
            if minus {
                "-"
            } else if is_before {
                "+"
            } else {
                ""
            },
            hour.unsigned_abs(),
            min.unsigned_abs(),
            (usec / 1_000_000).unsigned_abs()
        );
        frac_out((usec % 1_000_000).abs(), out);
    }
}

// ---------------------------------------------------------------------------------------
// arrays

fn array_out(
    type_oid: Oid,
    data: &[u8],
    users: &dyn UserTypes,
    out: &mut String,
    depth: u32,
) -> Result<(), BinaryError> {
    let mut pos = 0usize;
    let i32_at = |pos: &mut usize, what: &str| -> Result<i32, BinaryError> {
        let at = *pos;
        let b = data.get(at..at + 4).ok_or_else(|| {
            invalid(
                type_oid,
                format!("array truncated reading {what} at byte {at}"),
            )
        })?;
        *pos += 4;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let ndim = i32_at(&mut pos, "ndim")?;
    let _has_nulls = i32_at(&mut pos, "flags")?;
    let elem = i32_at(&mut pos, "element type")? as u32;
    if !(0..=6).contains(&ndim) {
        return Err(invalid(
            type_oid,
            format!("{ndim} dimensions (PostgreSQL allows 0..6)"),
        ));
    }
    let mut dims = Vec::with_capacity(ndim as usize);
    let mut lbounds = Vec::with_capacity(ndim as usize);
    for _ in 0..ndim {
        dims.push(i32_at(&mut pos, "dimension")?);
        lbounds.push(i32_at(&mut pos, "lower bound")?);
    }
    if ndim == 0 {
        out.push_str("{}");
        return if pos == data.len() {
            Ok(())
        } else {
            Err(invalid(type_oid, "bytes after an empty array"))
        };
    }
    // Every element takes at least its 4-byte length, which bounds the count.
    let mut count: usize = 1;
    for &d in &dims {
        let d =
            usize::try_from(d).map_err(|_| invalid(type_oid, format!("negative dimension {d}")))?;
        count = count
            .checked_mul(d)
            .filter(|&c| c <= (data.len() - pos) / 4)
            .ok_or_else(|| invalid(type_oid, "dimensions exceed the bytes present"))?;
    }
    if count == 0 {
        out.push_str("{}");
        return Ok(());
    }
    if lbounds.iter().any(|&l| l != 1) {
        for (&d, &l) in dims.iter().zip(&lbounds) {
            let upper = i64::from(l) + i64::from(d) - 1;
            let _ = write!(out, "[{l}:{upper}]");
        }
        out.push('=');
    }
    let mut elems = Vec::with_capacity(count);
    for _ in 0..count {
        let len = i32_at(&mut pos, "element length")?;
        if len == -1 {
            elems.push(None);
            continue;
        }
        let len = usize::try_from(len)
            .map_err(|_| invalid(type_oid, format!("negative element length {len}")))?;
        let b = data.get(pos..).and_then(|r| r.get(..len)).ok_or_else(|| {
            invalid(
                type_oid,
                format!("element of {len} bytes overruns the array"),
            )
        })?;
        pos += len;
        let mut s = String::new();
        render_into(elem, b, users, &mut s, depth + 1)?;
        elems.push(Some(s));
    }
    if pos != data.len() {
        return Err(invalid(
            type_oid,
            format!("{} bytes after the last element", data.len() - pos),
        ));
    }
    let mut it = elems.into_iter();
    nest(&dims, &mut it, out);
    Ok(())
}

fn nest(dims: &[i32], elems: &mut impl Iterator<Item = Option<String>>, out: &mut String) {
    let Some((&n, rest)) = dims.split_first() else {
        return;
    };
    out.push('{');
    for i in 0..n {
        if i > 0 {
            out.push(',');
        }
        if rest.is_empty() {
            match elems.next().flatten() {
                Some(s) => quote_elem(&s, out),
                None => out.push_str("NULL"),
            }
        } else {
            nest(rest, elems, out);
        }
    }
    out.push('}');
}

/// `array_out`'s quoting: empty strings, `NULL`, and anything holding a delimiter, brace,
/// quote, backslash or white space are double-quoted, with `"` and `\` backslash-escaped.
fn quote_elem(s: &str, out: &mut String) {
    let needs = s.is_empty()
        || s.eq_ignore_ascii_case("NULL")
        || s.bytes().any(|b| {
            matches!(
                b,
                b'{' | b'}' | b',' | b'"' | b'\\' | b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c
            )
        });
    if !needs {
        out.push_str(s);
        return;
    }
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(oid: Oid, data: &[u8]) -> String {
        render(oid, data, &NoUserTypes).unwrap()
    }

    #[test]
    fn floats_match_float8out() {
        let f8 = |v: f64| r(oids::FLOAT8, &v.to_be_bytes());
        assert_eq!(f8(0.1), "0.1");
        assert_eq!(f8(1e20), "1e+20");
        assert_eq!(f8(1e15), "1e+15");
        assert_eq!(f8(1e14), "100000000000000");
        assert_eq!(f8(1.5e-7), "1.5e-07");
        assert_eq!(f8(0.0001), "0.0001");
        assert_eq!(f8(-0.0), "-0");
        assert_eq!(f8(5e-324), "5e-324");
        assert_eq!(f8(f64::NAN), "NaN");
        assert_eq!(f8(f64::NEG_INFINITY), "-Infinity");
        let f4 = |v: f32| r(oids::FLOAT4, &v.to_be_bytes());
        assert_eq!(f4(3.25159), "3.25159");
        assert_eq!(f4(1e-5), "1e-05");
        assert_eq!(f4(123456.0), "123456");
        assert_eq!(f4(1234567.0), "1.234567e+06");
    }

    #[test]
    fn numeric_dscale_and_specials() {
        // 123456789.000100: ndigits 4, weight 2, dscale 6: 1 2345 6789 . 0001
        let mut b = vec![0, 4, 0, 2, 0, 0, 0, 6];
        for d in [1u16, 2345, 6789, 1] {
            b.extend_from_slice(&d.to_be_bytes());
        }
        assert_eq!(r(oids::NUMERIC, &b), "123456789.000100");
        // -0.001 with dscale 3: weight -1, digit 10.
        let b = [0, 1, 0xff, 0xff, 0x40, 0, 0, 3, 0, 10];
        assert_eq!(r(oids::NUMERIC, &b), "-0.001");
        assert_eq!(r(oids::NUMERIC, &[0, 0, 0, 0, 0xC0, 0, 0, 0]), "NaN");
        assert_eq!(r(oids::NUMERIC, &[0, 0, 0, 0, 0xF0, 0, 0, 0]), "-Infinity");
        assert_eq!(r(oids::NUMERIC, &[0, 0, 0, 0, 0, 0, 0, 2]), "0.00");
        assert!(render(oids::NUMERIC, &[0, 9, 0, 0, 0, 0, 0, 0], &NoUserTypes).is_err());
    }

    #[test]
    fn dates_and_times() {
        assert_eq!(r(oids::DATE, &0i32.to_be_bytes()), "2000-01-01");
        assert_eq!(r(oids::DATE, &(-1i32).to_be_bytes()), "1999-12-31");
        assert_eq!(r(oids::DATE, &i32::MAX.to_be_bytes()), "infinity");
        assert_eq!(
            r(oids::TIMESTAMPTZ, &0i64.to_be_bytes()),
            "2000-01-01 00:00:00+00"
        );
        assert_eq!(
            r(oids::TIMESTAMP, &(-1i64).to_be_bytes()),
            "1999-12-31 23:59:59.999999"
        );
        assert_eq!(r(oids::TIME, &1_500_000i64.to_be_bytes()), "00:00:01.5");
        // Extreme values must not panic.
        for v in [i64::MIN + 1, i64::MAX - 1] {
            let _ = r(oids::TIMESTAMPTZ, &v.to_be_bytes());
        }
        for v in [i32::MIN + 1, i32::MAX - 1] {
            let _ = r(oids::DATE, &v.to_be_bytes());
        }
    }

    #[test]
    fn intervals_in_postgres_style() {
        let iv = |t: i64, d: i32, m: i32| {
            let mut b = t.to_be_bytes().to_vec();
            b.extend_from_slice(&d.to_be_bytes());
            b.extend_from_slice(&m.to_be_bytes());
            r(oids::INTERVAL, &b)
        };
        assert_eq!(iv(0, 0, 0), "00:00:00");
        assert_eq!(iv(14_706_700_000, 3, 14), "1 year 2 mons 3 days 04:05:06.7");
        assert_eq!(iv(7_200_000_000, -1, 0), "-1 days +02:00:00");
        assert_eq!(iv(0, 0, 1200), "100 years");
        assert_eq!(
            iv(-14_706_000_000, 3, -14),
            "-1 years -2 mons +3 days -04:05:06"
        );
    }

    #[test]
    fn unsupported_and_invalid_name_the_oid() {
        let e = render(869, &[1, 2, 3, 4], &NoUserTypes).unwrap_err();
        assert_eq!(e, BinaryError::Unsupported(869));
        assert!(e.to_string().contains("869"));
        let e = render(oids::INT4, &[1, 2], &NoUserTypes).unwrap_err();
        assert!(e.to_string().contains("oid 23"), "{e}");
        // Array with a huge dimension and no elements: no allocation, an error.
        let mut a = Vec::new();
        for v in [1i32, 0, 23, i32::MAX, 1] {
            a.extend_from_slice(&v.to_be_bytes());
        }
        assert!(render(1007, &a, &NoUserTypes).is_err());
    }
}
