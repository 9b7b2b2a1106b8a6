//! What every command shares: writing the output, and failures with a hint.

/// `println!` for the command's output: a reader that has gone away (`intracom … |
/// head`) ends the command quietly, where `println!` would panic. See [`write_out`].
macro_rules! out {
    () => {
        $crate::output::write_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

use std::io::Write;

use intracom::Error;

/// A failure with a hint for the operator.
pub(crate) struct Failure {
    pub(crate) message: String,
    pub(crate) hint: Option<String>,
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        let hint = match &error {
            Error::Config { .. } | Error::ConfigFile { .. } => Some(
                "keys and defaults: `intracom config`, or the README's Configuration section"
                    .to_string(),
            ),
            Error::Unavailable { medium: "mqtt", .. } => Some(
                "check that the broker is reachable at the URL (--url, common.intracom.mqtt.url)"
                    .to_string(),
            ),
            Error::Unavailable { medium: "http", .. } => Some(
                "check that a gateway answers at common.intracom.http.url (`intracom serve`)"
                    .to_string(),
            ),
            Error::Unavailable { .. } => Some(
                "check that MongoDB is reachable at the URI (try `intracom doctor`)".to_string(),
            ),
            Error::Unsupported { medium, .. } if medium == "mqtt" => Some(
                "a broker keeps no history: `tail` follows from now on MQTT (drop --since)"
                    .to_string(),
            ),
            Error::NoWorker { .. } => Some(
                "start a worker of the service (`serve`/`work`), then publish again".to_string(),
            ),
            Error::UnknownSender { .. } | Error::UnknownAction { .. } => {
                Some("see `intracom catalog list`; add with `intracom catalog add`".to_string())
            }
            Error::Timeout { .. } => {
                Some("is a worker serving this action? raise --timeout if it is slow".to_string())
            }
            _ => None,
        };
        Failure {
            message: error.to_string(),
            hint,
        }
    }
}

pub(crate) fn fail(message: impl Into<String>, hint: impl Into<String>) -> Failure {
    Failure {
        message: message.into(),
        hint: Some(hint.into()),
    }
}

pub(crate) type Outcome = Result<(), Failure>;

/// Writes the command's output. When the reader has closed the pipe (`intracom config |
/// head -5`), the command has nothing more to say: it exits at once with status 0 and
/// no message (`println!` panics with "failed printing to stdout"). Any other write
/// error ends it with status 1 and the error. The commands that hold state the exit
/// would lose (`tail --name`) write with [`try_write_out`] instead and stop first.
pub(crate) fn write_out(args: std::fmt::Arguments<'_>) {
    match try_write_out(args) {
        Ok(true) => {}
        Ok(false) => std::process::exit(0),
        Err(e) => {
            eprintln!("error: cannot write the output: {e}");
            std::process::exit(1);
        }
    }
}

/// Writes and flushes the command's output: `Ok(false)` when the reader has gone away.
pub(crate) fn try_write_out(args: std::fmt::Arguments<'_>) -> std::io::Result<bool> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e),
    }
}
