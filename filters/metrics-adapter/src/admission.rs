//! Label-value admission, free of proxy-wasm: which values of a capped label
//! keep their own series, decided once per Envoy process across every worker
//! VM.
//!
//! Each capped label (route, cluster, every header label) has one list of
//! admitted values in proxy-wasm shared data, one value per line. A VM keeps
//! what it has learnt in a [`LabelSlot`]; for a value it does not know it
//! reads the list (bytes and CAS token) and asks [`LabelSlot::consult`]: the
//! value is on the list (use it), there is room (write the list with the
//! value appended, compare-and-swap on the token just read), or the list is
//! full (report `other`, and stop reading: the list never shrinks). The
//! stage performs the reads and writes; nothing here calls the host.
//!
//! The first request of a value decides: a value is either always itself or
//! always `other`, on every worker.

use ahash::AHashMap as HashMap;

use crate::logic::{LabelSpec, NONE, OVERFLOW};

/// Index of `none` in every slot.
pub const NONE_IX: u16 = 0;
/// Index of `other` in every slot: the answer whenever the shared list cannot
/// be read or written, or every attempt lost its compare-and-swap.
pub const OTHER_IX: u16 = 1;
/// Reads and compare-and-swap writes tried for one value before it is
/// reported as `other` (another worker wrote in between each time).
pub const ATTEMPTS: usize = 4;

/// Labels bounded by construction (11 methods, 7 status classes): no shared
/// list, every value is itself.
pub const BOUNDED: &[&str] = &["method", "status_class"];

/// Most labels a config can have: route, cluster, method, status_class and
/// [`crate::logic::MAX_HEADER_LABELS`] header labels.
pub const MAX_LABELS: usize = 4 + crate::logic::MAX_HEADER_LABELS;

/// One label set: each label's value as an index into its slot.
pub type LabelKey = [u16; MAX_LABELS];

/// Shared-data key of a label's admitted-values list. `plugin` is the
/// plugin name, so two plugins in one VM never share a list.
pub fn shared_key(plugin: &str, label: &str) -> String {
    format!("meshpatterns.metrics_adapter.{plugin}.labels.{label}")
}

/// One label's values as this VM knows them: index 0 is `none`, 1 is
/// `other`, then every value admitted (by any worker VM) that this VM met.
#[derive(Debug, Clone)]
pub struct LabelSlot {
    pub name: String,
    /// Shared-data key of the admitted-values list (unused when not capped).
    pub shared_key: String,
    max: u32,
    capped: bool,
    index: HashMap<String, u16>,
    values: Vec<String>,
    /// The shared list was seen full (it never shrinks): misses are `other`.
    full: bool,
    /// The raw value ([`recall`](LabelSlot::recall)) last resolved, and its
    /// index. One: a few entries cost more than they save where most values
    /// miss (a header label of user ids over its cap: +1,050 wasm
    /// instructions per request with four, `make profile`).
    last: Option<(Vec<u8>, u16)>,
}

/// Raw values longer than this are not kept by [`LabelSlot::keep`].
pub const MAX_RECALL_BYTES: usize = 256;

/// What [`LabelSlot::consult`] decided after reading the shared list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Consult {
    /// Report the value at this index.
    Use(u16),
    /// Write these bytes as the new list (compare-and-swap on the token read
    /// with it); on success call [`LabelSlot::admitted`], on a CAS mismatch
    /// read and consult again.
    Write(Vec<u8>),
}

/// What to do with a label value not yet seen by this VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Already admitted (by any worker).
    Known,
    /// Room left: admit it (append to the shared list).
    Admit,
    /// The cap is reached: report [`OVERFLOW`].
    Overflow,
}

/// Decide for `value` given the values admitted so far for a label with cap
/// `max`. `none` and `other` are always allowed and do not count.
pub fn admit(admitted: &[String], max: u32, value: &str) -> Admission {
    if value == NONE || value == OVERFLOW || admitted.iter().any(|a| a == value) {
        Admission::Known
    } else if admitted.len() < max as usize {
        Admission::Admit
    } else {
        Admission::Overflow
    }
}

/// The admitted-values list as stored in shared data: one value per line
/// (values are sanitised, so they hold no newline).
pub fn decode_admitted(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes).lines().filter(|l| !l.is_empty()).map(str::to_string).collect()
}

pub fn encode_admitted(values: &[String]) -> Vec<u8> {
    values.join("\n").into_bytes()
}

impl LabelSlot {
    /// The slot of `label`; its list lives under [`shared_key`]`(plugin, name)`.
    pub fn new(label: &LabelSpec, plugin: &str) -> LabelSlot {
        let values = vec![NONE.to_string(), OVERFLOW.to_string()];
        let index = values.iter().zip([NONE_IX, OTHER_IX]).map(|(v, i)| (v.clone(), i)).collect();
        LabelSlot {
            name: label.name.clone(),
            shared_key: shared_key(plugin, &label.name),
            max: label.max_values,
            capped: !BOUNDED.contains(&label.name.as_str()),
            index,
            values,
            full: false,
            last: None,
        }
    }

    /// The index of `raw` (property or header bytes as read) when it is the
    /// raw value this slot resolved last. A label's values mostly repeat (one
    /// route, one cluster, one method), and a raw value always sanitises to
    /// the same label value, whose index never changes once given, so a hit
    /// skips decoding, sanitising and the lookup.
    pub fn recall(&self, raw: &[u8]) -> Option<u16> {
        self.last.as_ref().filter(|(r, _)| r.as_slice() == raw).map(|(_, ix)| *ix)
    }

    /// Remember that `raw` resolved to `ix`, for [`recall`](LabelSlot::recall).
    /// Not `other`: a value may be `other` for a moment (a failed hostcall)
    /// and admitted later. Not raw values past [`MAX_RECALL_BYTES`].
    pub fn keep(&mut self, raw: &[u8], ix: u16) {
        if ix == OTHER_IX || raw.len() > MAX_RECALL_BYTES {
            return;
        }
        let (r, i) = self.last.get_or_insert_with(|| (Vec::new(), ix));
        r.clear();
        r.extend_from_slice(raw);
        *i = ix;
    }

    /// Whether values of this label go through the shared list.
    pub fn capped(&self) -> bool {
        self.capped
    }

    /// The index of `value` when this VM can answer without the shared list
    /// (a value met before, a bounded label, a list seen full); `None`: read
    /// the list and [`consult`](LabelSlot::consult).
    pub fn local(&mut self, value: &str) -> Option<u16> {
        if let Some(ix) = self.index.get(value) {
            return Some(*ix);
        }
        if !self.capped {
            return Some(self.remember(value));
        }
        if self.full {
            return Some(OTHER_IX);
        }
        None
    }

    /// Decide for `value` given the shared list as just read (empty when the
    /// key does not exist yet).
    pub fn consult(&mut self, shared: &[u8], value: &str) -> Consult {
        let mut list = decode_admitted(shared);
        match admit(&list, self.max, value) {
            Admission::Known => Consult::Use(self.remember(value)),
            Admission::Overflow => {
                // Learn every admitted value once, then stop reading.
                for v in &list {
                    if !self.index.contains_key(v) {
                        self.remember(v);
                    }
                }
                self.full = true;
                Consult::Use(OTHER_IX)
            }
            Admission::Admit => {
                list.push(value.to_string());
                Consult::Write(encode_admitted(&list))
            }
        }
    }

    /// The write [`Consult::Write`] asked for succeeded: `value` is admitted.
    pub fn admitted(&mut self, value: &str) -> u16 {
        self.remember(value)
    }

    /// The value at `ix` (`other` for an index this slot never gave).
    pub fn value(&self, ix: u16) -> &str {
        self.values.get(usize::from(ix)).map(String::as_str).unwrap_or(OVERFLOW)
    }

    fn remember(&mut self, value: &str) -> u16 {
        let Ok(ix) = u16::try_from(self.values.len()) else { return OTHER_IX };
        if ix == u16::MAX {
            return OTHER_IX;
        }
        self.index.insert(value.to_string(), ix);
        self.values.push(value.to_string());
        ix
    }
}

/// The Envoy stat name of `metric` for label set `key` (see
/// [`crate::logic::stat_name`]).
pub fn stat_name(slots: &[LabelSlot], metric: &str, key: &LabelKey) -> String {
    let labels: Vec<(&str, &str)> = slots.iter().zip(key.iter()).map(|(s, ix)| (s.name.as_str(), s.value(*ix))).collect();
    crate::logic::stat_name(metric, &labels)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
    use super::*;

    fn spec(name: &str, max: u32) -> LabelSpec {
        LabelSpec { name: name.into(), max_values: max }
    }

    /// Shared data as Envoy keeps it: a value and a CAS token bumped on every write.
    #[derive(Default)]
    struct Store {
        value: Option<Vec<u8>>,
        cas: u32,
    }

    impl Store {
        fn get(&self) -> (Vec<u8>, u32) {
            (self.value.clone().unwrap_or_default(), self.cas)
        }
        fn set(&mut self, v: Vec<u8>, cas: u32) -> bool {
            if self.value.is_some() && cas != 0 && cas != self.cas {
                return false;
            }
            self.value = Some(v);
            self.cas += 1;
            true
        }
    }

    /// The protocol the stage runs over hostcalls, here over a [`Store`].
    fn intern(slot: &mut LabelSlot, store: &mut Store, value: &str) -> u16 {
        if let Some(ix) = slot.local(value) {
            return ix;
        }
        for _ in 0..ATTEMPTS {
            let (list, cas) = store.get();
            match slot.consult(&list, value) {
                Consult::Use(ix) => return ix,
                Consult::Write(bytes) => {
                    if store.set(bytes, cas) {
                        return slot.admitted(value);
                    }
                }
            }
        }
        OTHER_IX
    }

    #[test]
    fn admission_caps_distinct_values() {
        let l = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(admit(&l(&[]), 2, "a"), Admission::Admit);
        assert_eq!(admit(&l(&["a"]), 2, "a"), Admission::Known);
        assert_eq!(admit(&l(&["a", "b"]), 2, "c"), Admission::Overflow);
        assert_eq!(admit(&l(&["a", "b"]), 2, "none"), Admission::Known);
        assert_eq!(admit(&l(&["a", "b"]), 2, "other"), Admission::Known);
        let v = l(&["a", "b-c"]);
        assert_eq!(decode_admitted(&encode_admitted(&v)), v);
        assert!(decode_admitted(b"").is_empty());
        assert!(decode_admitted(b"\n").is_empty());
    }

    #[test]
    fn consult_decides_from_the_list_read() {
        let mut s = LabelSlot::new(&spec("tenant", 2), "p");
        assert_eq!(s.shared_key, "meshpatterns.metrics_adapter.p.labels.tenant");
        assert_eq!(s.local("none"), Some(NONE_IX));
        assert_eq!(s.local("other"), Some(OTHER_IX));
        assert_eq!(s.local("a"), None);
        // Room: write the list with the value appended; known once the write succeeds.
        assert_eq!(s.consult(b"", "a"), Consult::Write(b"a".to_vec()));
        let a = s.admitted("a");
        assert_eq!(s.local("a"), Some(a));
        assert_eq!(s.value(a), "a");
        // Admitted by another worker: used without a write.
        assert_eq!(s.consult(b"a\nb", "b"), Consult::Use(3));
        // Full: other, and the VM stops asking.
        assert_eq!(s.consult(b"a\nb", "c"), Consult::Use(OTHER_IX));
        assert_eq!(s.local("d"), Some(OTHER_IX));
        assert_eq!(s.local("b"), Some(3));
        assert_eq!(s.value(999), "other");
    }

    #[test]
    fn recall_answers_only_the_last_raw_value_kept() {
        let mut s = LabelSlot::new(&spec("route", 4), "p");
        assert_eq!(s.recall(b""), None, "nothing kept yet");
        s.keep(b"outbound|80||app", 2);
        assert_eq!(s.recall(b"outbound|80||app"), Some(2));
        assert_eq!(s.recall(b"outbound|80||ap"), None);
        assert_eq!(s.recall(b"outbound|80||app2"), None);
        s.keep(b"r2", 3);
        assert_eq!((s.recall(b"r2"), s.recall(b"outbound|80||app")), (Some(3), None), "one value: the last");
        // `other` may be transient, and long raw values are not kept
        s.keep(b"x", OTHER_IX);
        s.keep(&[b'a'; MAX_RECALL_BYTES + 1], 3);
        assert_eq!((s.recall(b"x"), s.recall(&[b'a'; MAX_RECALL_BYTES + 1]), s.recall(b"r2")), (None, None, Some(3)));
        s.keep(&[b'a'; MAX_RECALL_BYTES], 3);
        assert_eq!(s.recall(&[b'a'; MAX_RECALL_BYTES]), Some(3));
    }

    #[test]
    fn bounded_labels_never_use_the_shared_list() {
        let mut m = LabelSlot::new(&spec("method", 9), "p");
        assert!(!m.capped());
        let get = m.local("GET").unwrap();
        assert_eq!(m.local("GET"), Some(get));
        assert_ne!(m.local("POST"), Some(get));
        assert!(LabelSlot::new(&spec("route", 200), "p").capped());
    }

    #[test]
    fn two_workers_sharing_one_list_never_admit_more_than_the_cap() {
        let mut store = Store::default();
        let mut w1 = LabelSlot::new(&spec("tenant", 3), "p");
        let mut w2 = LabelSlot::new(&spec("tenant", 3), "p");
        let mut seen: Vec<(String, String)> = Vec::new();
        for i in 0..10 {
            let v = format!("t{i}");
            let (a, b) = if i % 2 == 0 { (&mut w1, &mut w2) } else { (&mut w2, &mut w1) };
            let ix = intern(a, &mut store, &v);
            seen.push((v.clone(), a.value(ix).to_string()));
            // The other worker reports the same value the same way.
            let ix2 = intern(b, &mut store, &v);
            assert_eq!(b.value(ix2), a.value(ix), "{v}");
        }
        let own: Vec<&(String, String)> = seen.iter().filter(|(v, r)| v == r).collect();
        assert_eq!(own.len(), 3, "{seen:?}");
        assert_eq!(decode_admitted(&store.get().0), ["t0", "t1", "t2"]);
        assert!(seen.iter().skip(3).all(|(_, r)| r == "other"), "{seen:?}");
    }

    #[test]
    fn a_lost_compare_and_swap_reads_again() {
        let mut store = Store::default();
        store.set(b"x".to_vec(), 0);
        let mut s = LabelSlot::new(&spec("tenant", 2), "p");
        let (list, cas) = store.get();
        let Consult::Write(bytes) = s.consult(&list, "a") else { panic!("expected a write") };
        // Another worker admits "b" first: our write is refused...
        store.set(b"x\nb".to_vec(), cas);
        assert!(!store.set(bytes, cas));
        // ...and the next read finds the list full.
        let (list, _) = store.get();
        assert_eq!(s.consult(&list, "a"), Consult::Use(OTHER_IX));
        assert_eq!(s.local("b"), Some(3), "learnt from the full list");
    }

    #[test]
    fn stat_names_use_each_slots_values() {
        let mut slots = vec![LabelSlot::new(&spec("route", 5), "p"), LabelSlot::new(&spec("method", 9), "p")];
        let r = slots[0].admitted("app");
        let m = slots[1].local("GET").unwrap();
        let mut key = [NONE_IX; MAX_LABELS];
        key[0] = r;
        key[1] = m;
        assert_eq!(stat_name(&slots, "requests_total", &key), "route=.=app;.;method=.=GET;.;meshpatterns_http_requests_total");
        key[0] = OTHER_IX;
        assert_eq!(stat_name(&slots, "errors_total", &key), "route=.=other;.;method=.=GET;.;meshpatterns_http_errors_total");
    }
}
