//! `with-test-postgres COMMAND [ARGS...]`: runs COMMAND with one shared ephemeral PostgreSQL
//! server for the whole test run, named by `TAILOR_TEST_DATABASE_URL`, and removes the server
//! afterwards whatever happens. Exits with COMMAND's status.

use std::process::Command;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(program) = args.next() else {
        eprintln!("usage: with-test-postgres COMMAND [ARGS...]");
        std::process::exit(2);
    };
    let server = match tailor::embedded::EmbeddedPostgres::start() {
        Ok(server) => server,
        Err(error) => {
            eprintln!("with-test-postgres: {error} ({})", error.code());
            std::process::exit(2);
        }
    };
    eprintln!(
        "with-test-postgres: PostgreSQL on 127.0.0.1:{} for this test run",
        server.port()
    );
    let mut child = match Command::new(&program)
        .args(args)
        .env("TAILOR_TEST_DATABASE_URL", server.url("postgres"))
        .spawn()
    {
        Ok(child) => child,
        Err(error) => {
            eprintln!("with-test-postgres: cannot run {program}: {error}");
            std::process::exit(2);
        }
    };
    // Ctrl-C reaches the command through the terminal; we stay alive to clean up after it.
    // SAFETY: setting a signal disposition to SIG_IGN is always sound.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
    let status = child.wait().expect("wait for the command");
    drop(server);
    std::process::exit(status.code().unwrap_or(1));
}
