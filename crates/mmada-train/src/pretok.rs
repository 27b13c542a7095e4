//! `mmada-train data pretokenize` over a recipe: the code tables themselves (schema,
//! reading, writing, encoding) live in [`mmada_data::code_table`]; this module only knows
//! which sources and preprocessing a recipe's `data:` section names.

use std::path::Path;

use mmada_data::ImageCoder;
use mmada_data::code_table::{CodeTableError, preprocess_for, pretokenize};
use mmada_data::manifest::Manifest;

use crate::recipe::DataSection;

/// [`pretokenize`] over the mmu and t2i sources of a recipe's `data:` section, with its
/// `image_tokenizer` preprocessing (paths relative to `base`).
///
/// # Errors
/// As [`pretokenize`]; manifest files that do not read.
pub fn pretokenize_recipe(
    data: &DataSection,
    base: &Path,
    coder: &dyn ImageCoder,
    out: &Path,
) -> Result<usize, CodeTableError> {
    let it = data.image_tokenizer.clone().unwrap_or_default();
    let rel = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };
    let mut manifests = vec![];
    for section in [&data.t2i, &data.mmu] {
        for spec in &section.sources {
            let m = match (&spec.manifest, &spec.inline) {
                (Some(path), _) => Manifest::from_file(&rel(path))?,
                (_, Some(m)) => m.clone(),
                (None, None) => continue,
            };
            let m = match &spec.path {
                Some(p) => m.with_source_path(p.clone()),
                None => m,
            };
            let p = preprocess_for(Some(m.task), it.resolution, it.t2i_mode, it.mmu_mode);
            manifests.push((m, p));
        }
    }
    let root = data.data_root.as_ref().map(|r| rel(r));
    pretokenize(&manifests, root.as_deref(), coder, out)
}
