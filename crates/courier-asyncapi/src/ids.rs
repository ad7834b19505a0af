//! Ids of channels, operations, messages and schemas: `[A-Za-z0-9_.-]+`, unique.

use std::collections::{BTreeMap, BTreeSet};

/// `name` with every character AsyncAPI does not allow in a component key replaced by `_`.
pub(crate) fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() { "_".to_owned() } else { s }
}

/// The id of message `name` version `version` (`MAJOR.MINOR`): the name with `.` and
/// other separators as `_`, then `_v<MAJOR>`, e.g. `restaurant_MenuRevised_v1`.
pub(crate) fn message_id(name: &str, version: &str) -> String {
    let flat: String = sanitize(name)
        .chars()
        .map(|c| if c == '.' || c == '-' { '_' } else { c })
        .collect();
    format!("{flat}_v{}", sanitize(major(version)))
}

/// The major part of `MAJOR.MINOR` (the whole text when there is no dot).
pub(crate) fn major(version: &str) -> &str {
    version.split('.').next().unwrap_or(version)
}

/// Unique ids in one namespace, one per key.
#[derive(Debug)]
pub(crate) struct Ids<K> {
    by_key: BTreeMap<K, String>,
    taken: BTreeSet<String>,
}

impl<K: Ord + Clone> Ids<K> {
    pub(crate) fn new() -> Self {
        Self {
            by_key: BTreeMap::new(),
            taken: BTreeSet::new(),
        }
    }

    /// The id of `key`, or a new one: the first free of `candidates`, else the first
    /// candidate with `_2`, `_3`, ...
    pub(crate) fn id(&mut self, key: &K, candidates: &[String]) -> String {
        if let Some(id) = self.by_key.get(key) {
            return id.clone();
        }
        let first = candidates
            .first()
            .cloned()
            .unwrap_or_else(|| "_".to_owned());
        let id = candidates
            .iter()
            .find(|c| !self.taken.contains(*c))
            .cloned()
            .unwrap_or_else(|| {
                (2..)
                    .map(|n| format!("{first}_{n}"))
                    .find(|c| !self.taken.contains(c))
                    .unwrap_or(first)
            });
        self.taken.insert(id.clone());
        self.by_key.insert(key.clone(), id.clone());
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_carry_the_major_version() {
        assert_eq!(
            message_id("restaurant.MenuRevised", "1.3"),
            "restaurant_MenuRevised_v1"
        );
        assert_eq!(message_id("a-b c", "2"), "a_b_c_v2");
    }

    #[test]
    fn ids_are_unique_and_stable() {
        let mut ids = Ids::new();
        assert_eq!(ids.id(&1, &["a".into()]), "a");
        assert_eq!(ids.id(&2, &["a".into(), "b".into()]), "b");
        assert_eq!(ids.id(&3, &["a".into()]), "a_2");
        assert_eq!(ids.id(&1, &["z".into()]), "a");
    }
}
