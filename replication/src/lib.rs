//! The replicated store of confmesh: shared configuration and conference status, multi-master,
//! last-writer-wins by hybrid logical clock, durable on local disk before it is acknowledged.
#![forbid(unsafe_code)]
