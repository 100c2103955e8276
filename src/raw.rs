//! Binary pass-through values for tokio-postgres: parameters and results carried as the
//! type's binary send form, whatever the type.
//!
//! Owns [`RawParam`] and [`RawValue`]. pgoutput's binary mode, binary COPY and the extended
//! protocol's binary format all carry the same per-type send representation, so shadowmig
//! moves values between them without ever converting to Rust types — which is what lets keys
//! of any type (composite, text, uuid, numeric, enums…) page and compare correctly. This
//! module must never interpret the bytes.

use std::error::Error;

use bytes::{Bytes, BytesMut};
use postgres_types::{to_sql_checked, FromSql, IsNull, ToSql, Type};

/// A parameter sent as raw binary bytes; the server reads them with the parameter type's
/// receive function.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RawParam(pub Bytes);

impl ToSql for RawParam {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// A result column taken as its raw binary bytes (use `Option<RawValue>` for nullable
/// columns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawValue(pub Bytes);

impl<'a> FromSql<'a> for RawValue {
    fn from_sql(_ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
        Ok(RawValue(Bytes::copy_from_slice(raw)))
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }
}

/// A result column borrowed as its raw binary bytes, without copying (use
/// `Option<RawRef>` for nullable columns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawRef<'a>(pub &'a [u8]);

impl<'a> FromSql<'a> for RawRef<'a> {
    fn from_sql(_ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
        Ok(RawRef(raw))
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }
}
