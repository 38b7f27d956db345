//! `-cpu MODEL[,FEATURE...]`, read the way QEMU's x86 target reads it: the model name, then
//! comma-separated features, each `+NAME`, `-NAME` (the compatibility syntax), `NAME=VALUE` or
//! a bare `NAME` (meaning `NAME=on`). Underscores in a name become dashes, and `tsc-freq` is
//! `tsc-frequency` in metric units. Empty pieces are skipped. Pure text work: which models and
//! properties exist is the machine's business (`machine::cpu`).

use crate::options::error::OptionError;

/// One feature of a `-cpu` option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CpuFeature {
    /// `+NAME`: the feature on, applied after every `NAME=VALUE`.
    Plus(String),
    /// `-NAME`: the feature off, applied after every `+NAME`.
    Minus(String),
    /// `NAME=VALUE` (or bare `NAME`): a property of the CPU, in command-line order.
    Set { name: String, value: String },
}

/// A parsed `-cpu` option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuOption {
    pub model: String,
    pub features: Vec<CpuFeature>,
    /// QEMU's warnings about the option, as it prints them while parsing (mixing `+x` and
    /// `x=...`), without the "warning: " prefix.
    pub warnings: Vec<String>,
}

impl CpuOption {
    /// Parses the text of a `-cpu` option. `-cpu ""` is refused as QEMU refuses it; a
    /// malformed `tsc-freq` is refused here, as QEMU refuses it while reading the features.
    pub fn parse(text: &str) -> Result<CpuOption, OptionError> {
        let (model, rest) = match text.split_once(',') {
            Some((m, r)) => (m, Some(r)),
            None => (text, None),
        };
        if text.is_empty() {
            return Err(OptionError::CpuOptionEmpty);
        }
        let mut option = CpuOption {
            model: model.to_string(),
            features: Vec::new(),
            warnings: Vec::new(),
        };
        let (mut plus, mut minus) = (Vec::<String>::new(), Vec::<String>::new());
        let mut ambiguous = false;
        for piece in rest.unwrap_or("").split(',').filter(|p| !p.is_empty()) {
            if let Some(name) = piece.strip_prefix('+') {
                plus.push(name.to_string());
                continue;
            }
            if let Some(name) = piece.strip_prefix('-') {
                minus.push(name.to_string());
                continue;
            }
            let (name, value) = match piece.split_once('=') {
                Some((n, v)) => (n.replace('_', "-"), v.to_string()),
                None => (piece.replace('_', "-"), "on".to_string()),
            };
            for (sign, list) in [('+', &plus), ('-', &minus)] {
                if list.contains(&name) {
                    option.warnings.push(format!(
                        "Ambiguous CPU model string. Don't mix both \"{sign}{name}\" and \"{name}={value}\""
                    ));
                    ambiguous = true;
                }
            }
            if name == "tsc-freq" {
                let hz = crate::options::values::strtosz_metric(&value)
                    .ok()
                    .filter(|&hz| hz <= i64::MAX as u64)
                    .ok_or_else(|| OptionError::BadNumericalValue(value.clone()))?;
                option.features.push(CpuFeature::Set {
                    name: "tsc-frequency".into(),
                    value: hz.to_string(),
                });
                continue;
            }
            option.features.push(CpuFeature::Set { name, value });
        }
        if ambiguous {
            option.warnings.push(
                "Compatibility of ambiguous CPU model strings won't be kept on future QEMU versions"
                    .into(),
            );
        }
        option
            .features
            .extend(plus.into_iter().map(CpuFeature::Plus));
        option
            .features
            .extend(minus.into_iter().map(CpuFeature::Minus));
        Ok(option)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(name: &str, value: &str) -> CpuFeature {
        CpuFeature::Set {
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn model_and_features_in_qemus_order() {
        let c = CpuOption::parse("qemu64,+lm,phys_bits=33,,-pae,host-phys-bits").unwrap();
        assert_eq!(c.model, "qemu64");
        // Properties first (in order), then every "+", then every "-".
        assert_eq!(
            c.features,
            [
                set("phys-bits", "33"),
                set("host-phys-bits", "on"),
                CpuFeature::Plus("lm".into()),
                CpuFeature::Minus("pae".into()),
            ]
        );
        assert!(c.warnings.is_empty());
        assert_eq!(CpuOption::parse("max").unwrap().features, []);
        assert_eq!(CpuOption::parse(",phys-bits=33").unwrap().model, "");
    }

    #[test]
    fn empty_and_bad_tsc_freq_are_refused_while_reading() {
        assert_eq!(
            crate::Error::from(CpuOption::parse("").unwrap_err()).message(),
            "-cpu option cannot be empty"
        );
        assert_eq!(
            crate::Error::from(CpuOption::parse("qemu64,tsc-freq=x").unwrap_err()).message(),
            "bad numerical value x"
        );
        assert_eq!(
            CpuOption::parse("qemu64,tsc_freq=2.5G").unwrap().features,
            [set("tsc-frequency", "2500000000")]
        );
    }

    #[test]
    fn mixing_plus_and_assignment_warns_as_qemu_does() {
        let c = CpuOption::parse("qemu64,+lm,lm=off").unwrap();
        assert_eq!(
            c.warnings,
            [
                "Ambiguous CPU model string. Don't mix both \"+lm\" and \"lm=off\"",
                "Compatibility of ambiguous CPU model strings won't be kept on future QEMU versions"
            ]
        );
        // An assignment before the "+" is not ambiguous for QEMU: it only looks back.
        assert!(CpuOption::parse("qemu64,lm=off,+lm")
            .unwrap()
            .warnings
            .is_empty());
    }
}
