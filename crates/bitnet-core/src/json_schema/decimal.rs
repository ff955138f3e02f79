//! Numbers with bounds (`minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum` on
//! `"type": "number"`), exactly: bounds and values are fixed-point decimals in units of 10^-18
//! (an i128 holds 18 digits before the point and 18 after), so "0.3" is compared as 0.3, not as
//! the nearest double. A bounded number is written without an exponent; every prefix the
//! matcher accepts can still end inside the bounds (the set of values a prefix can still reach
//! is an interval, or a union of them for the integer part, intersected with the bounds').

use crate::json_mode::{Num, NumStep};

/// 1 in units of 10^-18.
pub(crate) const UNIT: i128 = 1_000_000_000_000_000_000;
/// No bound (beyond every value the units can hold).
const INF: i128 = 1 << 120;
/// Digits the fixed point holds on each side of the point.
const DIGITS: u8 = 18;

/// An interval of values in units; `lo_open` / `hi_open`: the end is excluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Range {
    pub lo: i128,
    pub lo_open: bool,
    pub hi: i128,
    pub hi_open: bool,
}

impl Range {
    pub(crate) const ALL: Range = Range { lo: -INF, lo_open: false, hi: INF, hi_open: false };

    fn meets(&self, o: &Range) -> bool {
        let (lo, lo_open) = match self.lo.cmp(&o.lo) {
            std::cmp::Ordering::Greater => (self.lo, self.lo_open),
            std::cmp::Ordering::Less => (o.lo, o.lo_open),
            std::cmp::Ordering::Equal => (self.lo, self.lo_open || o.lo_open),
        };
        let (hi, hi_open) = match self.hi.cmp(&o.hi) {
            std::cmp::Ordering::Less => (self.hi, self.hi_open),
            std::cmp::Ordering::Greater => (o.hi, o.hi_open),
            std::cmp::Ordering::Equal => (self.hi, self.hi_open || o.hi_open),
        };
        lo < hi || (lo == hi && !lo_open && !hi_open)
    }

    /// Values whose magnitude lies in [a, b) (b = `INF`: no end), with the sign; a negative
    /// value is never zero ("-0" is not written).
    fn signed(neg: bool, a: i128, a_open: bool, b: i128) -> Range {
        if neg {
            Range { lo: -b, lo_open: true, hi: -a, hi_open: a_open || a == 0 }
        } else {
            Range { lo: a, lo_open: a_open, hi: b, hi_open: true }
        }
    }
}

/// A bound as written in the schema, in units; `None` when it needs more than 18 digits on
/// either side of the point.
pub(crate) fn parse_bound(n: &serde_json::Number) -> Option<i128> {
    let text = n.to_string();
    let (neg, t) = match text.strip_prefix('-') {
        Some(t) => (true, t),
        None => (false, text.as_str()),
    };
    let (mant, exp) = match t.find(['e', 'E']) {
        Some(i) => (&t[..i], t[i + 1..].parse::<i32>().ok()?),
        None => (t, 0),
    };
    let (ip, fp) = mant.split_once('.').unwrap_or((mant, ""));
    let digits: String = format!("{ip}{fp}");
    // the value is digits * 10^(exp - fp.len()); as units: digits * 10^(exp - fp.len() + 18)
    let shift = exp - fp.len() as i32 + DIGITS as i32;
    let digits = digits.trim_start_matches('0');
    if digits.is_empty() {
        return Some(0);
    }
    let (digits, shift) = if shift < 0 {
        // digits below 10^-18 must all be zero
        let cut = (-shift) as usize;
        if cut > digits.len() || digits[digits.len() - cut..].bytes().any(|d| d != b'0') {
            return None;
        }
        (&digits[..digits.len() - cut], 0)
    } else {
        (digits, shift as usize)
    };
    if digits.len() + shift > 2 * DIGITS as usize {
        return None;
    }
    let mut v: i128 = digits.parse().ok()?;
    for _ in 0..shift {
        v *= 10;
    }
    Some(if neg { -v } else { v })
}

/// Where a bounded number stands: its sign, the digits read (`int` before the point, `frac`
/// after it as units: `fd` digits so far), `huge` once the integer part has more than 18 digits
/// (beyond every bound), `tail` once a nonzero digit came past the 18th after the point (the
/// value is then strictly above `frac`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DecPrefix {
    lex: Num,
    neg: bool,
    fd: u8,
    huge: bool,
    tail: bool,
    int: u64,
    frac: u64,
}

impl DecPrefix {
    /// The first byte of a number.
    pub(crate) fn start(b: u8) -> Option<DecPrefix> {
        let lex = Num::start(b)?;
        let int = if matches!(lex, Num::Int(_)) { (b - b'0') as u64 } else { 0 };
        Some(DecPrefix { lex, neg: b == b'-', fd: 0, huge: false, tail: false, int, frac: 0 })
    }

    /// The next byte: `Next` with the new prefix, `End` when the number is complete and `b`
    /// follows it (the caller checks [`DecPrefix::ends_within`]), or `Reject` (exponents are not
    /// written).
    pub(crate) fn step(self, b: u8) -> (NumStep, DecPrefix) {
        let mut p = self;
        let lex = match self.lex.step(b) {
            NumStep::Next(Num::Exp) => return (NumStep::Reject, p),
            NumStep::Next(l) => l,
            other => return (other, p),
        };
        if b.is_ascii_digit() {
            let d = (b - b'0') as u64;
            match lex {
                Num::Int(_) | Num::Zero if !p.huge => {
                    if p.int >= 100_000_000_000_000_000 {
                        p.huge = true;
                    } else {
                        p.int = p.int * 10 + d;
                    }
                }
                Num::Frac if p.fd < DIGITS => {
                    p.fd += 1;
                    p.frac += d * 10u64.pow((DIGITS - p.fd) as u32);
                }
                Num::Frac => p.tail |= d != 0,
                _ => {}
            }
        }
        p.lex = lex;
        (NumStep::Next(lex), p)
    }

    /// The magnitude read so far, in units.
    fn magnitude(&self) -> i128 {
        self.int as i128 * UNIT + self.frac as i128
    }

    /// Whether some number starting with this prefix lies in `r`.
    pub(crate) fn feasible(&self, r: &Range) -> bool {
        if self.huge {
            // more integer digits than any bound has: only an open end reaches it
            let side = if self.neg { r.lo == -INF } else { r.hi == INF };
            return side;
        }
        let m = self.magnitude();
        match self.lex {
            // "-": any negative value
            Num::Minus => r.meets(&Range::signed(true, 0, true, INF)),
            // "0" (or "-0"): 0 itself, or 0.xxx
            Num::Zero => r.meets(&Range::signed(self.neg, 0, false, UNIT)),
            // integer digits: [m 10^k, (m + 1) 10^k) for any count k of digits still to come
            Num::Int(_) => {
                let (mut a, mut b) = (self.int as i128, self.int as i128 + 1);
                while a < 10i128.pow(DIGITS as u32) {
                    if r.meets(&Range::signed(self.neg, a * UNIT, false, b * UNIT)) {
                        return true;
                    }
                    a *= 10;
                    b *= 10;
                }
                // or more digits than the fixed point holds
                if self.neg {
                    r.lo == -INF
                } else {
                    r.hi == INF
                }
            }
            Num::Dot => r.meets(&Range::signed(self.neg, m, false, m + UNIT)),
            // fd digits after the point: [m, m + 10^-fd); past 18 digits, within one unit
            _ => {
                let width = 10i128.pow((DIGITS - self.fd) as u32);
                r.meets(&Range::signed(self.neg, m, self.tail, m + width))
            }
        }
    }

    /// Whether the number read (complete) lies in `r`.
    pub(crate) fn ends_within(&self, r: &Range) -> bool {
        if self.huge {
            return if self.neg { r.lo == -INF } else { r.hi == INF };
        }
        let m = self.magnitude();
        if self.neg && m == 0 && !self.tail {
            // "-0", "-0.0": not written
            return false;
        }
        let v = if self.tail {
            // strictly between m and m + 1 unit: bounds are whole units, so the open interval
            // meets the bounds exactly when the value is within them
            Range::signed(self.neg, m, true, m + 1)
        } else {
            let v = if self.neg { -m } else { m };
            Range { lo: v, lo_open: false, hi: v, hi_open: false }
        };
        r.meets(&v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(s: &str) -> Option<i128> {
        parse_bound(&serde_json::from_str::<serde_json::Number>(s).unwrap())
    }

    #[test]
    fn bounds_parse_exactly() {
        assert_eq!(bound("0"), Some(0));
        assert_eq!(bound("0.3"), Some(3 * UNIT / 10));
        assert_eq!(bound("-2.5"), Some(-5 * UNIT / 2));
        assert_eq!(bound("1e3"), Some(1000 * UNIT));
        assert_eq!(bound("1.5e-7"), Some(150_000_000_000));
        assert_eq!(bound("100"), Some(100 * UNIT));
        assert_eq!(bound("1e-18"), Some(1));
        assert_eq!(bound("1e-19"), None);
        assert_eq!(bound("1e18"), None);
        assert_eq!(bound("123456789012345678"), Some(123456789012345678 * UNIT));
    }

    /// Feeds `text` (then a space) to a prefix; `Some(true)` if it ends within `r`, `Some(false)`
    /// if refused at its end, `None` if refused earlier.
    fn run(text: &str, r: &Range) -> Option<bool> {
        let b = text.as_bytes();
        let mut p = DecPrefix::start(b[0])?;
        if !p.feasible(r) {
            return None;
        }
        for &c in &b[1..] {
            match p.step(c) {
                (NumStep::Next(_), q) if q.feasible(r) => p = q,
                _ => return None,
            }
        }
        match p.step(b' ') {
            (NumStep::End, _) => Some(p.ends_within(r)),
            _ => Some(false),
        }
    }

    #[test]
    fn prefixes_stay_feasible_and_values_land_within() {
        let b = |s: &str| bound(s).unwrap();
        // 0 < x <= 0.3
        let r = Range { lo: 0, lo_open: true, hi: b("0.3"), hi_open: false };
        assert_eq!(run("0.3", &r), Some(true));
        assert_eq!(run("0.25", &r), Some(true));
        assert_eq!(run("0.30000", &r), Some(true));
        assert_eq!(run("0.300000000000000000001", &r), None);
        assert_eq!(run("0", &r), Some(false));
        assert_eq!(run("0.0", &r), Some(false));
        assert_eq!(run("0.0000000000000000000001", &r), Some(true));
        assert_eq!(run("0.31", &r), None);
        assert_eq!(run("1", &r), None);
        assert_eq!(run("-", &r), None);
        assert_eq!(run("0e1", &r), None);
        // -10 <= x < 1000
        let r = Range { lo: b("-10"), lo_open: false, hi: b("1000"), hi_open: true };
        assert_eq!(run("-10", &r), Some(true));
        assert_eq!(run("-10.5", &r), None);
        assert_eq!(run("-9.99", &r), Some(true));
        assert_eq!(run("999.999", &r), Some(true));
        assert_eq!(run("1000", &r), None); // 1000.x too
        assert_eq!(run("10000", &r), None);
        assert_eq!(run("12", &r), Some(true));
        assert_eq!(run("-0", &r), Some(false));
        assert_eq!(run("-0.5", &r), Some(true));
        // x >= 5 (no upper bound): any number of digits
        let r = Range { lo: b("5"), lo_open: false, hi: INF, hi_open: false };
        assert_eq!(run("4", &r), Some(false));
        assert_eq!(run("40", &r), Some(true));
        assert_eq!(run("123456789012345678901234567890", &r), Some(true)); // beyond the fixed point
        let r = Range { lo: -INF, lo_open: false, hi: b("5"), hi_open: false };
        assert_eq!(run("123456789012345678901234567890", &r), None);
        assert_eq!(run("-123456789012345678901234567890", &r), Some(true));
        assert_eq!(run("-1", &r), Some(true));
        assert_eq!(run("6", &r), None);
    }
}
