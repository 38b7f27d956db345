//! What can be wrong with an option or a value, each as QEMU 10 words it. Converted to the
//! C-facing [`Error`] in one place (`From<OptionError> for Error`), which gives the class and
//! the hint; nothing classifies these errors by their text.

use crate::error::{Error, HmErrorClass};

/// The hint QEMU prints after a malformed size.
pub const SIZE_HINT: &str = "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.\n";

const ID_HINT: &str =
    "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.\n";

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("'{0}' is not a size")]
    NotASize(String),
    #[error("size '{0}' does not fit in 64 bits")]
    SizeOverflow(String),
    #[error("'{0}' is not a boolean")]
    NotABoolean(String),
    /// A value of the wrong type, in the option parser's words ("expects a size value").
    #[error("Parameter '{name}' expects {expected}")]
    Expects {
        name: String,
        expected: &'static str,
    },
    /// A size that is no size, in the words of `-m`'s own parser (with the suffix hint).
    #[error("Parameter '{0}' expects a non-negative number below 2^64")]
    ExpectsSize(String),
    #[error("Value '{value}' is out of range for parameter '{name}'")]
    OutOfRange { name: String, value: String },
    #[error("Parameter '{0}' is missing")]
    Missing(String),
    #[error("Invalid parameter '{0}'")]
    InvalidParameter(String),
    #[error("Expected '=' after parameter '{0}'")]
    ExpectedEquals(String),
    #[error("Parameter '{name}' does not accept value '{value}'")]
    BadValue { name: String, value: String },
    #[error("Parameter 'id' expects an identifier")]
    BadId,
    #[error("Duplicate ID '{0}' for object")]
    DuplicateId(String),
    /// A property the object's class does not have, e.g. "kvm-accel.foo".
    #[error("Property '{class}.{name}' not found")]
    PropertyNotFound { class: String, name: String },
    #[error("{0}: invalid option")]
    InvalidOption(String),
    #[error("{0}: requires an argument")]
    RequiresArgument(String),
    #[error("{0}: hostmem's vmm takes no disk image")]
    DiskImage(String),
    /// `-monitor` with a backend hostmem lacks: QEMU reports it twice, the second time as a
    /// parse error of the option (both lines located).
    #[error("'{0}' is not a valid char driver\n-monitor {0}: parse error: {0}")]
    NotACharDriver(String),
    #[error("cannot use stdio by multiple character devices")]
    StdioInUse,
    #[error("invalid accelerator {0}")]
    InvalidAccelerator(String),
    #[error("The -accel and \"-machine accel=\" options are incompatible")]
    AccelConflict,
    /// `-m N` is read again as "NM" after the first check; QEMU reports that second failure
    /// without the option's location.
    #[error("Parameter 'memory.size' expects size")]
    MemorySizeReparse,
    /// A `-smp` member that is no number, named as QEMU's machine property visitor names it.
    #[error("Parameter 'smp.{0}' expects integer")]
    SmpNotInteger(String),
    #[error("Parameter 'smp.{0}' is unexpected")]
    SmpUnexpected(String),
    #[error("-cpu option cannot be empty")]
    CpuOptionEmpty,
    /// `-cpu ...,tsc-freq=X` that is no frequency.
    #[error("bad numerical value {0}")]
    BadNumericalValue(String),
    #[error("Invalid CPU topology: CPU topology parameters must be greater than zero")]
    ZeroTopology,
    /// An error found while reading one option, with that option as QEMU's location prefix.
    #[error("{option} {arg}: {error}")]
    At {
        option: String,
        arg: String,
        error: Box<OptionError>,
    },
}

impl OptionError {
    /// `self` located at option `option` with argument `arg` ("-m 1x: ...").
    pub fn at(self, option: &str, arg: &str) -> OptionError {
        OptionError::At {
            option: option.to_string(),
            arg: arg.to_string(),
            error: Box::new(self),
        }
    }

    /// Whether QEMU reports this error with the location of the option being read. The checks
    /// it makes after reading (the topology, `-m`'s second parse) come without.
    pub fn is_located(&self) -> bool {
        !matches!(
            self,
            OptionError::MemorySizeReparse
                | OptionError::SmpNotInteger(_)
                | OptionError::SmpUnexpected(_)
                | OptionError::ZeroTopology
                | OptionError::CpuOptionEmpty
                | OptionError::BadNumericalValue(_)
        )
    }

    fn hint(&self) -> Option<&'static str> {
        match self {
            OptionError::ExpectsSize(_) => Some(SIZE_HINT),
            OptionError::BadId => Some(ID_HINT),
            OptionError::At { error, .. } => error.hint(),
            _ => None,
        }
    }

    fn class(&self) -> HmErrorClass {
        match self {
            OptionError::MemorySizeReparse | OptionError::SmpNotInteger(_) => HmErrorClass::Generic,
            OptionError::DuplicateId(_) => HmErrorClass::Duplicate,
            OptionError::At { error, .. } => error.class(),
            _ => HmErrorClass::InvalidParameter,
        }
    }
}

impl From<OptionError> for Error {
    fn from(e: OptionError) -> Error {
        let err = Error::new(e.class(), e.to_string());
        match e.hint() {
            Some(h) => err.with_hint(h),
            None => err,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn located_errors_carry_the_option_and_keep_class_and_hint() {
        let e: Error = OptionError::ExpectsSize("size".into())
            .at("-m", "1x")
            .into();
        assert_eq!(
            e.message(),
            "-m 1x: Parameter 'size' expects a non-negative number below 2^64"
        );
        assert_eq!(e.hint(), Some(SIZE_HINT));
        assert_eq!(e.class(), HmErrorClass::InvalidParameter);
        let dup: Error = OptionError::DuplicateId("m".into())
            .at("-object", "x")
            .into();
        assert_eq!(dup.class(), HmErrorClass::Duplicate);
    }

    #[test]
    fn checks_made_after_reading_are_not_located() {
        assert!(!OptionError::ZeroTopology.is_located());
        assert!(!OptionError::MemorySizeReparse.is_located());
        assert!(OptionError::InvalidParameter("x".into()).is_located());
        let e: Error = OptionError::MemorySizeReparse.into();
        assert_eq!(e.class(), HmErrorClass::Generic);
    }
}
