//! Masking functions a data owner applies to fields it shares as `masked`.
//!
//! Each mask is a pure function from the stored text to the text that may leave the
//! member ([`Mask::apply`]), and a DataFusion function registered only in the member's
//! private context ([`register`]), so that a caller can neither call a mask itself
//! (for example to compute keyed hashes of guesses) nor see the key.
//!
//! Masks work on characters, not bytes, so Chinese names are cut correctly. A value
//! too short to keep its visible parts without revealing everything is hidden
//! completely.

use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::error::Result as DfResult;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub use crate::config::access::Mask;

impl Mask {
    /// The SQL function applying this mask (not for [`Mask::Deny`], which is a NULL).
    pub fn function_name(self) -> String {
        format!("fedgate_mask_{}", self.name())
    }

    /// Masks one value. `key` is the member's secret, used by [`Mask::Hmac`] only.
    pub fn apply(self, value: &str, key: &[u8]) -> Option<String> {
        Some(match self {
            Mask::IdKeepEnds => keep(value, 6, 4),
            Mask::IdRegion => keep(value, 6, 0),
            Mask::Phone => keep(&phone_digits(value), 3, 4),
            Mask::Surname => surname(value),
            Mask::Hmac => keyed_hash(value, key),
            Mask::Deny => return None,
        })
    }
}

/// Keeps the first `head` and last `tail` characters and replaces the rest with `*`.
/// When fewer than four characters would be hidden, everything is hidden.
fn keep(value: &str, head: usize, tail: usize) -> String {
    let chars: Vec<char> = value.trim().chars().collect();
    let n = chars.len();
    if n < head + tail + 4 {
        return "*".repeat(n.max(1));
    }
    let mut out: String = chars[..head].iter().collect();
    out.extend(std::iter::repeat_n('*', n - head - tail));
    out.extend(&chars[n - tail..]);
    out
}

/// A mobile number's digits without a `+86` prefix, spaces or hyphens.
fn phone_digits(value: &str) -> String {
    let v = value.trim();
    let v = v.strip_prefix("+86").unwrap_or(v);
    v.chars().filter(|c| !matches!(c, ' ' | '-')).collect()
}

/// Two-character surnames that are common enough to keep whole.
const COMPOUND_SURNAMES: &[&str] = &[
    "欧阳", "司马", "诸葛", "上官", "东方", "皇甫", "尉迟", "公孙", "慕容", "长孙", "宇文", "司徒",
    "夏侯", "轩辕", "令狐", "钟离", "端木", "南宫", "西门", "独孤", "澹台", "呼延", "万俟", "闻人",
];

/// The surname followed by one `*`, whatever the length of the given name, so the
/// length is not revealed either.
fn surname(value: &str) -> String {
    let v = value.trim();
    let keep = if COMPOUND_SURNAMES.iter().any(|s| v.starts_with(s)) && v.chars().count() > 2 {
        2
    } else {
        1
    };
    let mut out: String = v.chars().take(keep).collect();
    out.push('*');
    out
}

fn keyed_hash(value: &str, key: &[u8]) -> String {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(value.trim().as_bytes());
    hex::encode(&mac.finalize().into_bytes()[..16])
}

/// Registers every mask function in a member's private context.
pub fn register(ctx: &SessionContext, key: Arc<[u8]>) {
    for m in [
        Mask::IdKeepEnds,
        Mask::IdRegion,
        Mask::Phone,
        Mask::Surname,
        Mask::Hmac,
    ] {
        ctx.register_udf(ScalarUDF::from(MaskUdf {
            name: m.function_name(),
            mask: m,
            key: key.clone(),
            signature: Signature::exact(vec![DataType::Utf8], Volatility::Immutable),
        }));
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct MaskUdf {
    name: String,
    mask: Mask,
    key: Arc<[u8]>,
    signature: Signature,
}

impl ScalarUDFImpl for MaskUdf {
    fn name(&self) -> &str {
        &self.name
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Utf8)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        crate::owner::mapping::map_text(args, |s| self.mask.apply(s, &self.key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn masks_keep_only_their_visible_parts() {
        let k = b"k";
        assert_eq!(
            Mask::IdKeepEnds.apply("33010619870315123X", k).unwrap(),
            "330106********123X"
        );
        assert_eq!(
            Mask::IdRegion.apply("33010619870315123X", k).unwrap(),
            "330106************"
        );
        assert_eq!(Mask::Phone.apply("13812341234", k).unwrap(), "138****1234");
        assert_eq!(
            Mask::Phone.apply("+86 138-1234-1234", k).unwrap(),
            "138****1234"
        );
        assert_eq!(Mask::Surname.apply("张伟", k).unwrap(), "张*");
        assert_eq!(Mask::Surname.apply(" 张小伟 ", k).unwrap(), "张*");
        assert_eq!(Mask::Surname.apply("欧阳娜", k).unwrap(), "欧阳*");
        // A two-character name starting like a compound surname keeps one character.
        assert_eq!(Mask::Surname.apply("欧阳", k).unwrap(), "欧*");
        assert_eq!(Mask::Deny.apply("x", k), None);
        // Too short to keep anything without revealing it all.
        assert_eq!(Mask::IdKeepEnds.apply("1234567", k).unwrap(), "*******");
    }

    #[test]
    fn keyed_hash_is_stable_per_key_and_differs_between_keys() {
        let a = Mask::Hmac.apply("330106198703151234", b"one").unwrap();
        assert_eq!(a.len(), 32);
        assert_eq!(a, Mask::Hmac.apply("330106198703151234", b"one").unwrap());
        assert_ne!(a, Mask::Hmac.apply("330106198703151234", b"two").unwrap());
        assert_ne!(a, Mask::Hmac.apply("330106198703151235", b"one").unwrap());
    }

    proptest! {
        /// Whatever the ID, the masked form never contains the hidden middle digits as
        /// a run: everything between the kept ends is `*`.
        #[test]
        fn id_masks_hide_the_middle(id in "[0-9]{17}[0-9X]") {
            let m = Mask::IdKeepEnds.apply(&id, b"k").unwrap();
            prop_assert_eq!(m.chars().count(), 18);
            prop_assert_eq!(&m[..6], &id[..6]);
            prop_assert_eq!(&m[14..], &id[14..]);
            prop_assert!(m[6..14].chars().all(|c| c == '*'));
            let r = Mask::IdRegion.apply(&id, b"k").unwrap();
            prop_assert!(r[6..].chars().all(|c| c == '*'));
        }

        #[test]
        fn phone_mask_hides_the_middle(p in "1[3-9][0-9]{9}") {
            let m = Mask::Phone.apply(&p, b"k").unwrap();
            prop_assert_eq!(&m[..3], &p[..3]);
            prop_assert_eq!(&m[3..7], "****");
            prop_assert_eq!(&m[7..], &p[7..]);
        }
    }
}
