//! `courier contract check OLD NEW`: does a new AsyncAPI document break the old one's
//! consumers?

use anyhow::Result;
use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;

/// Compare message contracts (AsyncAPI documents)
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    #[command(subcommand)]
    command: Subcommand,
}

#[derive(clap::Subcommand, Debug)]
enum Subcommand {
    Check(CheckArgs),
}

/// Fail when NEW breaks what was written against OLD
#[derive(clap::Args, Debug)]
#[command(
    long_about = "Compare two AsyncAPI 3 documents (YAML or JSON, e.g. from `courier \
asyncapi`) and fail when NEW breaks consumers or producers written against OLD. Message types \
are matched by name and major version; their payload schemas are compared field by field, \
following $refs.

Breaking: a message type removed without a later major version in NEW (a removed v1 with a \
v2 present is a major bump: printed as a note on stderr, not a failure); a changed content \
type; a required field removed or renamed; a required field made optional or an optional \
one made required; a new required field; a changed type or format (e.g. uint32 -> uint64); \
a field that may now be null or no longer may; an enum value or variant removed or added.
Compatible: new optional fields, removed optional fields, new message types, channels and \
operations, documentation.

Output and exit status:
  0  compatible: prints `compatible`
  1  breaking: prints one line per breaking change, e.g.
     order.OrderPlaced v1: field items[].price: type changed from integer to string
  2  a document cannot be read or is not an AsyncAPI 3 document (the error names the file)

Examples:
  courier contract check asyncapi-released.yaml asyncapi.yaml
  git show v1.4.0:asyncapi.yaml > /tmp/old.yaml && courier contract check /tmp/old.yaml asyncapi.yaml"
)]
struct CheckArgs {
    /// The released document (what consumers were written against)
    #[arg(value_name = "OLD")]
    old: PathBuf,

    /// The document to release
    #[arg(value_name = "NEW")]
    new: PathBuf,
}

/// How `courier contract check` ends when the answer is not "compatible": its exit
/// status says why (`main` maps it, without an `error:` line for breaking changes).
#[derive(Debug)]
pub(crate) enum Exit {
    /// Breaking changes were printed.
    Breaking(usize),
    /// A document could not be read or parsed.
    Unreadable(courier_asyncapi::Error),
}

impl Exit {
    /// Say what is wrong (the breaking changes are already on stdout) and give the exit
    /// status: 1 breaking, 2 unreadable.
    pub(crate) fn report(&self) -> ExitCode {
        match self {
            Self::Breaking(_) => ExitCode::from(1),
            Self::Unreadable(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Breaking(n) => write!(f, "{n} breaking changes"),
            Self::Unreadable(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Exit {}

pub(crate) fn run(args: Args) -> Result<()> {
    match args.command {
        Subcommand::Check(args) => check(args),
    }
}

fn check(args: CheckArgs) -> Result<()> {
    let old = courier_asyncapi::load(&args.old).map_err(Exit::Unreadable)?;
    let new = courier_asyncapi::load(&args.new).map_err(Exit::Unreadable)?;
    let found = courier_asyncapi::compare(&old, &new);
    for note in &found.notes {
        eprintln!("note: {note}");
    }
    if found.is_compatible() {
        super::common::out("compatible")?;
        return Ok(());
    }
    for breaking in &found.breaking {
        super::common::out(breaking)?;
    }
    Err(Exit::Breaking(found.breaking.len()).into())
}
