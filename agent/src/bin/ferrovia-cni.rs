//! `ferrovia-cni`: the chained CNI plugin. A thin shell around [`ferrovia_agent::cni::run`]:
//! the runtime's environment and stdin in, the spec's JSON on stdout, the exit code out.
use std::io::{Read, Write};
use std::process::ExitCode;

use ferrovia_agent::cni::{self, CniEnv, CniError, ErrorCode, Outcome};

fn main() -> ExitCode {
    let env = CniEnv::from_process();
    let mut stdin = Vec::new();
    let outcome = if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        Outcome::error(
            cni::spec::FALLBACK_VERSION,
            &CniError::new(
                ErrorCode::Io,
                format!("cannot read the network config from stdin: {e}"),
            ),
        )
    } else {
        // One invocation, one or two RPCs: a current-thread runtime is all it needs.
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime.block_on(cni::run(&env, &stdin)),
            Err(e) => Outcome::error(
                cni::spec::FALLBACK_VERSION,
                &CniError::new(
                    ErrorCode::Io,
                    format!("cannot start the async runtime: {e}"),
                ),
            ),
        }
    };

    for line in &outcome.log {
        eprintln!("ferrovia-cni: {line}");
    }
    let mut stdout = std::io::stdout().lock();
    if stdout
        .write_all(outcome.stdout.as_bytes())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        // The runtime is gone; there is nobody left to tell.
        return ExitCode::FAILURE;
    }
    ExitCode::from(outcome.exit_code)
}
