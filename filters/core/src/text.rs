//! Numbers as text on the request path, by hand: `format!` and `to_string`
//! go through `core::fmt`, which costs several times as much per number
//! inside the VM. Each output is exactly what `{n}` and `{n:x}` print.

/// A number's digits, on the stack (at most 20: `u64::MAX` in decimal).
#[derive(Clone, Copy)]
pub struct Digits {
    buf: [u8; 20],
    start: usize,
}

impl Digits {
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(self.start..).unwrap_or_default()
    }
    #[inline]
    pub fn as_str(&self) -> &str {
        // SAFETY: `decimal_digits` and `hex_width` write only ASCII digits
        // and letters a-f.
        unsafe { std::str::from_utf8_unchecked(self.as_bytes()) }
    }
}

impl std::ops::Deref for Digits {
    type Target = str;
    #[inline]
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<[u8]> for Digits {
    #[inline]
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl std::fmt::Display for Digits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for Digits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// `n` in decimal, as `n.to_string()` prints it.
pub fn decimal(n: u64) -> String {
    decimal_digits(n).to_string()
}

/// [`decimal`] without an allocation: two digits per division, from a
/// table of the hundred pairs (the X-RateLimit-* values on every response).
#[inline]
pub fn decimal_digits(n: u64) -> Digits {
    let mut buf = [b'0'; 20];
    let mut start: usize = 20;
    let mut rest = n;
    while rest >= 10 {
        let pair = (rest % 100) as usize * 2;
        rest /= 100;
        // Two byte stores: a two-byte copy_from_slice is a memory.copy call.
        let (Some(&hi), Some(&lo)) = (PAIRS.get(pair), PAIRS.get(pair + 1)) else { break };
        let Some([a, b]) = start.checked_sub(2).and_then(|s| buf.get_mut(s..s + 2)) else { break };
        (*a, *b) = (hi, lo);
        start -= 2;
    }
    // One digit left (or none: n had an even number of digits).
    if rest > 0 || n == 0 {
        if let Some(d) = start.checked_sub(1).and_then(|s| buf.get_mut(s)) {
            *d = b'0' + rest as u8;
            start -= 1;
        }
    }
    Digits { buf, start }
}

/// "00", "01", ... "99".
const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

/// `n` in lowercase hexadecimal without leading zeros, as `format!("{n:x}")`.
pub fn hex(n: u64) -> String {
    hex_digits(n).to_string()
}

/// [`hex`] without an allocation.
#[inline]
pub fn hex_digits(n: u64) -> Digits {
    hex_width(n, 1)
}

/// `n` as 16 lowercase hex digits, as `format!("{n:016x}")`.
pub fn hex16(n: u64) -> String {
    hex_width(n, 16).to_string()
}

/// A finite `f` as `f.to_string()` prints it: the fewest digits that read
/// back as `f`, never an exponent (`90`, `0.25`, `100000000000000000000`);
/// where two digit strings of that length read back as `f`, either. Or
/// `None` for NaN and the infinities. The digits come from serde_json's
/// float printer, which every module links already: `f64`'s own `Display`
/// would add about 20 KB of `core::fmt` float code to each module.
pub fn float(f: f64) -> Option<String> {
    let printed = serde_json::Number::from_f64(f)?.to_string();
    // serde_json prints `-`? digits [`.` digits] [`e` sign? digits].
    let (sign, rest) = match printed.strip_prefix('-') {
        Some(r) => ("-", r),
        None => ("", printed.as_str()),
    };
    let (mantissa, exp) = match rest.split_once('e') {
        Some((m, e)) => (m, e.trim_start_matches('+').parse::<i32>().ok()?),
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    // All digits without the point, and where the point goes.
    let mut all: String = [int, frac].concat();
    let mut point = i32::try_from(int.len()).ok()?.checked_add(exp)?;
    // Leading zeros (as in `0.000123`) carry no value; trailing ones after the
    // point do not print.
    let leading = all.len() - all.trim_start_matches('0').len();
    all.drain(..leading);
    point -= i32::try_from(leading).ok()?;
    all.truncate(all.trim_end_matches('0').len());
    if all.is_empty() {
        return Some(format!("{sign}0"));
    }
    let len = i32::try_from(all.len()).ok()?;
    let mut out = String::with_capacity(all.len() + 4 + point.unsigned_abs() as usize);
    out.push_str(sign);
    if point <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', point.unsigned_abs() as usize));
        out.push_str(&all);
    } else if point >= len {
        out.push_str(&all);
        out.extend(std::iter::repeat_n('0', (point - len) as usize));
    } else {
        let (a, b) = all.split_at(point as usize);
        out.push_str(a);
        out.push('.');
        out.push_str(b);
    }
    Some(out)
}

/// `n` in lowercase hex, padded with zeros to at least `width` digits (at
/// most 16). Written from the last digit back, by iterator (no index
/// checks), each digit from a shift. (Decimal has its own writer,
/// [`decimal_digits`].)
fn hex_width(n: u64, width: usize) -> Digits {
    let mut buf = [b'0'; 20];
    let mut rest = n;
    let mut written = 0;
    for slot in buf.iter_mut().rev() {
        let d = (rest & 15) as u8;
        rest >>= 4;
        *slot = if d < 10 { b'0' + d } else { b'a' + d - 10 };
        written += 1;
        if rest == 0 && written >= width {
            break;
        }
    }
    Digits { buf, start: 20 - written }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn matches_core_fmt() {
        let mut samples = vec![0u64, 1, 9, 10, 11, 99, 100, 255, 256, 4095, 4096, 65535, u64::from(u32::MAX), u64::MAX - 1, u64::MAX];
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..2000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            samples.push(x >> (x % 64));
        }
        for n in samples {
            assert_eq!(decimal(n), n.to_string());
            assert_eq!(decimal_digits(n).as_str(), n.to_string());
            assert_eq!(hex(n), format!("{n:x}"));
            assert_eq!(hex_digits(n).as_str(), format!("{n:x}"));
            assert_eq!(hex16(n), format!("{n:016x}"));
        }
    }

    #[test]
    fn float_matches_core_fmt() {
        // Numbers as configs and metrics carry them (few digits, any scale)
        // print exactly as `to_string` prints them.
        let mut exact = vec![
            0.0f64,
            -0.0,
            1.0,
            -1.0,
            0.1,
            0.25,
            10.5,
            89.999,
            90.0,
            100.0,
            123.456,
            1e15,
            1e16,
            1e20,
            1e21,
            1e-7,
            0.000123,
            1.5e300,
            -2.5e-300,
            5e-324,
            f64::MAX,
            f64::MIN,
            f64::MIN_POSITIVE,
            f64::EPSILON,
        ];
        let mut any = Vec::new();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..20_000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            exact.push((x % 1_000_000) as f64 / 10f64.powi((x >> 40) as i32 % 12));
            let f = f64::from_bits(x);
            if f.is_finite() {
                any.push(f);
            }
        }
        for f in exact {
            assert_eq!(float(f).as_deref(), Some(f.to_string().as_str()), "{f:e}");
        }
        // Any other float: as many digits as `to_string` prints, reading back
        // as the same float. (Where two such digit strings exist, as for
        // 667082108456853.2 and .3, the two printers may choose differently.)
        for f in any {
            let text = float(f).unwrap_or_default();
            assert_eq!(text.len(), f.to_string().len(), "{f:e}");
            assert_eq!(text.parse::<f64>().ok(), Some(f), "{f:e}");
        }
        assert_eq!(float(f64::NAN), None);
        assert_eq!(float(f64::INFINITY), None);
        assert_eq!(float(f64::NEG_INFINITY), None);
    }
}
