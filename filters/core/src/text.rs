//! Numbers as text on the request path, by hand: `format!` and `to_string`
//! go through `core::fmt`, which costs several times as much per number
//! inside the VM. Each output is exactly what `{n}` and `{n:x}` print.

/// `n` in decimal, as `n.to_string()` prints it.
pub fn decimal(n: u64) -> String {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = n;
    loop {
        at -= 1;
        if let Some(d) = digits.get_mut(at) {
            *d = b'0' + (rest % 10) as u8;
        }
        rest /= 10;
        if rest == 0 || at == 0 {
            break;
        }
    }
    ascii(digits.get(at..).unwrap_or_default())
}

/// Digits as a `String` (ASCII, so always valid UTF-8).
fn ascii(digits: &[u8]) -> String {
    std::str::from_utf8(digits).map(str::to_owned).unwrap_or_default()
}

/// `n` in lowercase hexadecimal without leading zeros, as `format!("{n:x}")`.
pub fn hex(n: u64) -> String {
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut rest = n;
    loop {
        at -= 1;
        let nibble = (rest & 0xf) as u8;
        if let Some(d) = digits.get_mut(at) {
            *d = if nibble < 10 { b'0' + nibble } else { b'a' + nibble - 10 };
        }
        rest >>= 4;
        if rest == 0 || at == 0 {
            break;
        }
    }
    ascii(digits.get(at..).unwrap_or_default())
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
        }
    }
}
