//! `--set key.path=value` overrides of a YAML config tree: the one implementation behind
//! `mmada-train … --set` (recipes) and `mmada-infer … --set` (the `--config` file).

use serde_norway::Value;

/// Apply `key.path=value` overrides to a YAML tree; the value is parsed as YAML
/// (`1e-4`, `true`, `[a, b]`, strings). A path part may index a list: `tasks[1].share=2`.
///
/// # Errors
/// The offending override (with the reason when there is more to say than "expected
/// KEY.PATH=VALUE") when it has no `=`, an empty key, or an index outside the list it names.
pub fn apply(tree: &mut Value, overrides: &[String]) -> Result<(), String> {
    for o in overrides {
        let (key, value) = o.split_once('=').ok_or_else(|| o.clone())?;
        if key.trim().is_empty() {
            return Err(o.clone());
        }
        let value: Value =
            serde_norway::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
        let mut node = &mut *tree;
        let parts: Vec<&str> = key.trim().split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            // `name[3]`: the element 3 of the list `name`
            let (name, index) = match part.strip_suffix(']').and_then(|p| p.split_once('[')) {
                Some((n, ix)) => (n, Some(ix.parse::<usize>().map_err(|_| o.clone())?)),
                None => (*part, None),
            };
            if !node.is_mapping() {
                *node = Value::Mapping(Default::default());
            }
            let map = node.as_mapping_mut().expect("mapping");
            let k = Value::String(name.to_string());
            let last = i + 1 == parts.len();
            if last && index.is_none() {
                map.insert(k, value.clone());
                break;
            }
            if !map.contains_key(&k) {
                if index.is_some() {
                    return Err(format!("{o} (`{name}` is not a list here)"));
                }
                map.insert(k.clone(), Value::Mapping(Default::default()));
            }
            node = map.get_mut(&k).expect("just inserted");
            if let Some(ix) = index {
                let len = node.as_sequence().map_or(0, Vec::len);
                let Some(elem) = node.as_sequence_mut().and_then(|v| v.get_mut(ix)) else {
                    return Err(format!(
                        "{o} (`{name}` has {len} entries: valid indices 0..{len})"
                    ));
                };
                if last {
                    *elem = value.clone();
                    break;
                }
                node = elem;
            }
        }
    }
    Ok(())
}
