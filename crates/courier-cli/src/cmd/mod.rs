//! One module per subcommand, plus what they share.

pub(crate) mod asyncapi;
pub(crate) mod broker;
pub(crate) mod channels;
pub(crate) mod common;
pub(crate) mod contract;
pub(crate) mod dlq;
pub(crate) mod publish;
pub(crate) mod relay;
pub(crate) mod tail;
