//! Numbers as text on the request path, by hand: `format!` and `to_string`
//! go through `core::fmt`, which costs several times as much per number
//! inside the VM. Each output is exactly what `{n}` and `{n:x}` print.

/// `n` in decimal, as `n.to_string()` prints it.
pub fn decimal(n: u64) -> String {
    digits(n, 10, 1)
}

/// `n` in lowercase hexadecimal without leading zeros, as `format!("{n:x}")`.
pub fn hex(n: u64) -> String {
    digits(n, 16, 1)
}

/// `n` as 16 lowercase hex digits, as `format!("{n:016x}")`.
pub fn hex16(n: u64) -> String {
    digits(n, 16, 16)
}

/// `n` in `base` (at most 16), padded with zeros to at least `width` digits
/// (at most 20).
fn digits(n: u64, base: u64, width: usize) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [b'0'; 20];
    let mut at = buf.len();
    let mut rest = n;
    loop {
        at -= 1;
        if let (Some(d), Some(c)) = (buf.get_mut(at), DIGITS.get((rest % base) as usize)) {
            *d = *c;
        }
        rest /= base;
        if (rest == 0 && buf.len() - at >= width) || at == 0 {
            break;
        }
    }
    // ASCII, so always valid UTF-8.
    std::str::from_utf8(buf.get(at..).unwrap_or_default()).map(str::to_owned).unwrap_or_default()
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
            assert_eq!(hex(n), format!("{n:x}"));
            assert_eq!(hex16(n), format!("{n:016x}"));
        }
    }
}
