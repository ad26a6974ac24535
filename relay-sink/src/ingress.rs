//! Where batches come in. Each transport turns authenticated agent connections into calls of
//! [`Replay::submit`](crate::replay::Replay::submit) plus acknowledgements.

pub(crate) mod quic;
