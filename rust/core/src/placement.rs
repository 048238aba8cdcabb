//! Where the shards run: which CPUs the process may use, the CPUs a runtime
//! was given (its cpuset, Seastar's `--cpuset`), and the thread affinity
//! that follows from them.

use std::sync::OnceLock;

use crate::config::Config;
use crate::error::BuildError;

/// The CPUs this process may run on, read once, in increasing order:
/// pinning shard 0 narrows the calling thread's own affinity, which must not
/// shrink what later runtimes see.
pub(crate) fn allowed_cpus() -> &'static [usize] {
    static CPUS: OnceLock<Vec<usize>> = OnceLock::new();
    CPUS.get_or_init(|| {
        current_affinity()
            .map(|set| {
                (0..libc::CPU_SETSIZE as usize)
                    // SAFETY: `cpu` is below CPU_SETSIZE, the size of `set`.
                    .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// The calling thread's affinity, or `None` if it cannot be read.
pub(crate) fn current_affinity() -> Option<libc::cpu_set_t> {
    // SAFETY: `cpu_set_t` is a plain bit array, valid when zeroed.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable `cpu_set_t` of the size given; pid
    // 0 is the calling thread.
    let read =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    (read == 0).then_some(set)
}

/// Sets the calling thread's affinity; a failure (a CPU taken away since)
/// leaves the thread where it was, which is all that is lost.
pub(crate) fn set_affinity(set: &libc::cpu_set_t) {
    // SAFETY: `set` is a valid `cpu_set_t` of the size given; pid 0 is the
    // calling thread.
    unsafe {
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set);
    }
}

/// The set holding `cpus` (each below CPU_SETSIZE: every allowed CPU is).
fn cpu_set(cpus: &[usize]) -> libc::cpu_set_t {
    // SAFETY: `cpu_set_t` is a plain bit array, valid when zeroed.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        debug_assert!(cpu < libc::CPU_SETSIZE as usize);
        // SAFETY: `cpu` is an allowed CPU, so below CPU_SETSIZE.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    set
}

/// Where a runtime's threads run.
#[derive(Debug)]
pub(crate) enum Placement {
    /// Shard `i` runs on `cpus[i]` alone.
    Pinned(Vec<usize>),
    /// Every shard may run on any CPU of the set (a cpuset, unpinned).
    Within(Vec<usize>),
    /// Where the system puts them.
    Anywhere,
}

impl Placement {
    /// The affinity of shard `id`'s thread, if it gets one.
    pub(crate) fn affinity(&self, id: usize) -> Option<libc::cpu_set_t> {
        match self {
            Placement::Pinned(cpus) => Some(cpu_set(&cpus[id..=id])),
            Placement::Within(cpus) => Some(cpu_set(cpus)),
            Placement::Anywhere => None,
        }
    }
}

/// The number of shards and where they run, for `config`; an error for a
/// cpuset that names a CPU twice, one this process may not use, or fewer
/// CPUs than shards (unless overprovisioned).
pub(crate) fn plan(config: &Config) -> Result<(usize, Placement), BuildError> {
    let allowed = allowed_cpus();
    let cpus: Vec<usize> = match &config.cpuset {
        None => allowed.to_vec(),
        Some(cpus) => {
            check_cpuset(cpus, allowed)?;
            cpus.clone()
        }
    };
    let count = config.shards.unwrap_or(cpus.len().max(1));
    if count == 0 {
        return Err(BuildError::NoShards);
    }
    if count > crate::MAX_SHARDS {
        return Err(BuildError::TooManyShards {
            shards: count,
            max: crate::MAX_SHARDS,
        });
    }
    let spread = config.pin && !config.overprovisioned;
    if config.cpuset.is_some() && count > cpus.len() && !config.overprovisioned {
        return Err(BuildError::CpusetTooSmall {
            shards: count,
            cpus: cpus.len(),
        });
    }
    if spread && count <= cpus.len() && !cpus.is_empty() {
        return Ok((count, Placement::Pinned(cpus[..count].to_vec())));
    }
    if spread {
        static PIN_NOTICE: std::sync::Once = std::sync::Once::new();
        PIN_NOTICE.call_once(|| {
            eprintln!(
                "shardloop: {count} shards on {} available cores: pinning is off",
                cpus.len()
            );
        });
    }
    Ok(match config.cpuset {
        Some(_) => (count, Placement::Within(cpus)),
        None => (count, Placement::Anywhere),
    })
}

fn check_cpuset(cpus: &[usize], allowed: &[usize]) -> Result<(), BuildError> {
    if cpus.is_empty() {
        return Err(BuildError::EmptyCpuset);
    }
    for (i, cpu) in cpus.iter().enumerate() {
        if cpus[..i].contains(cpu) {
            return Err(BuildError::RepeatedCpu { cpu: *cpu });
        }
    }
    let refused: Vec<usize> = cpus
        .iter()
        .copied()
        .filter(|cpu| allowed.binary_search(cpu).is_err())
        .collect();
    if !refused.is_empty() {
        return Err(BuildError::CpusNotAllowed {
            cpus: refused,
            allowed: allowed.to_vec(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::cpu_list;

    fn config(cpuset: Option<Vec<usize>>, shards: Option<usize>, overprovisioned: bool) -> Config {
        Config {
            cpuset,
            shards,
            overprovisioned,
            ..Config::default()
        }
    }

    #[test]
    fn a_cpuset_pins_shard_i_to_its_ith_cpu() {
        let last = *allowed_cpus().last().unwrap();
        let (count, placement) = plan(&config(Some(vec![last]), None, false)).unwrap();
        assert_eq!(count, 1);
        assert!(matches!(placement, Placement::Pinned(ref cpus) if cpus == &[last]));
    }

    #[test]
    fn a_bad_cpuset_is_refused_with_its_reason() {
        let allowed = allowed_cpus();
        let outside = allowed.last().unwrap() + 1;
        let err = plan(&config(Some(vec![outside]), None, false)).unwrap_err();
        assert!(
            matches!(err, BuildError::CpusNotAllowed { ref cpus, .. } if cpus == &[outside]),
            "{err}"
        );
        assert!(err.to_string().contains(&cpu_list(allowed)), "{err}");
        let err = plan(&config(Some(vec![]), None, false)).unwrap_err();
        assert!(matches!(err, BuildError::EmptyCpuset));
        let first = allowed[0];
        let err = plan(&config(Some(vec![first, first]), None, false)).unwrap_err();
        assert!(matches!(err, BuildError::RepeatedCpu { cpu } if cpu == first));
    }

    #[test]
    fn more_shards_than_cpus_need_overprovisioning() {
        let first = allowed_cpus()[0];
        let err = plan(&config(Some(vec![first]), Some(2), false)).unwrap_err();
        assert!(matches!(
            err,
            BuildError::CpusetTooSmall { shards: 2, cpus: 1 }
        ));
        let (count, placement) = plan(&config(Some(vec![first]), Some(2), true)).unwrap();
        assert_eq!(count, 2);
        assert!(matches!(placement, Placement::Within(_)));
    }
}
