//! Verifier complexity: every program of the BPF object loaded on the running kernel, with
//! what the verifier reports about it. The kernel matrix (`cargo xtask vm-test`) records it
//! per kernel, as Cilium's verifier CI does, so a change that pushes a program toward the
//! verifier's limits shows up before a user's kernel refuses it.
use anyhow::{Context as _, Result, bail};
use aya::programs::Program;

use super::{BPF_OBJECT, MapSizes, fallback_of, lacks_set_retval, raise_memlock, size_maps};

/// The kernel's limit on instructions the verifier may process per program (since 5.2).
pub const COMPLEXITY_LIMIT: u32 = 1_000_000;

/// What the verifier made of one program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramStats {
    pub name: String,
    /// Instructions the verifier processed (`verified_insns`, Linux 5.16+): the complexity
    /// that counts against [`COMPLEXITY_LIMIT`]. `None` where the kernel does not say.
    pub verified_insns: Option<u32>,
    /// Instructions after the verifier's rewrites (`xlated_prog_len / 8`).
    pub xlated_insns: Option<u32>,
    /// Why the verifier refused it, for a program whose fallback variant took its place.
    pub refused: Option<String>,
}

/// Loads every program of the object into fresh, unpinned maps of `sizes` (nothing is
/// attached; nothing of a running agent is touched) and returns one entry per program, in
/// name order. A program the verifier refuses is an error, except a hook whose
/// fallback variant loads (that is the degradation `Datapath::load` reports).
pub fn verify_all(sizes: &MapSizes) -> Result<Vec<ProgramStats>> {
    if BPF_OBJECT.is_empty() {
        bail!("this binary was built with AYA_BUILD_SKIP=1 and carries no BPF object");
    }
    raise_memlock();
    let mut loader = aya::EbpfLoader::new();
    size_maps(&mut loader, sizes);
    let mut ebpf = loader.load(BPF_OBJECT).context("loading the BPF object")?;
    let mut stats = Vec::new();
    let mut rejected = Vec::new();
    for (name, prog) in ebpf.programs_mut() {
        let outcome = match prog {
            Program::SchedClassifier(p) => p.load(),
            Program::CgroupSockAddr(p) => p.load(),
            other => bail!("program {name}: unexpected type {:?}", other.prog_type()),
        };
        if let Err(e) = outcome {
            rejected.push((name.to_owned(), format!("{:#}", anyhow::Error::from(e))));
            continue;
        }
        let info = prog
            .info()
            .with_context(|| format!("reading the info of program {name}"))?;
        stats.push(ProgramStats {
            name: name.to_owned(),
            verified_insns: info.verified_instruction_count(),
            xlated_insns: info.size_translated().map(|b| b / 8),
            refused: None,
        });
    }
    for (name, error) in rejected {
        // As in `Datapath::load`: only a hook refused for the missing helper, whose fallback
        // loaded, is a degradation; any other refusal fails.
        let fallback = fallback_of(&name);
        if !lacks_set_retval(&error) || !fallback.is_some_and(|f| stats.iter().any(|s| s.name == f))
        {
            bail!("the verifier refused program {name}: {error}");
        }
        stats.push(ProgramStats {
            name,
            verified_insns: None,
            xlated_insns: None,
            refused: Some(super::verifier_reason(&error).to_owned()),
        });
    }
    stats.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(stats)
}
