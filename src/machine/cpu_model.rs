//! The shape of one of QEMU's x86 CPU models, shared by the generated table
//! (`x86_cpu_data.rs`) and the `-cpu` reader (`cpu.rs`) that looks models up in it.

/// One x86 CPU model of QEMU's (under TCG).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelData {
    /// The name `-cpu` takes, e.g. "qemu64", "EPYC-v4".
    pub name: &'static str,
    /// The QOM type, e.g. "qemu64-x86_64-cpu": the driver name of its `-cpu` properties.
    pub type_name: &'static str,
    /// CPUID vendor string ("" for "base", which has none).
    pub vendor: &'static str,
    /// Long mode (CPUID 8000_0001h EDX.LM): 64-bit.
    pub lm: bool,
    pub pae: bool,
    pub pse36: bool,
    /// Only an accelerator that runs on the host CPU can provide it ("host").
    pub host_cpuid_required: bool,
}
