//! Seeing every call: the access log (one JSON line per call, [`access_log`]) and
//! OpenTelemetry traces (one span per sampled call, exported over OTLP/gRPC, [`trace`]).
//!
//! With both off ([`Observer::new`] gives `None`) a call carries nothing and pays one
//! branch. With either on, each call carries one boxed [`CallObs`]: made when its request
//! headers arrive, told each backend it is offered to, fed the response's frames (bytes,
//! `grpc-status`, `grpc-message`) and finished where the response ends (or where the
//! proxy answers itself). Finishing ends the span and hands the same box to the access
//! log's queue: the line is formatted on the writer's thread, off the call path.
//! The proxy's own answers (health, reflection) are seen the same way, through the
//! bodies in [`body`], with no backend.
//!
//! # One span, of kind SERVER
//!
//! The proxy is a server to its client and a client to the backend; it makes one span of
//! kind SERVER per call, child of the client's `traceparent`, and names that span as the
//! backend's parent. Why not a SERVER span with a CLIENT child per attempt: the proxy
//! adds no work of its own that a second span would show (its time is the SERVER span's
//! less the backend's), retries are rare and only happen before a backend took the call
//! (the attempts are an attribute), and one span per call halves the export cost. The
//! backend's own SERVER span sits right under it, so a trace reads client → switchyard →
//! backend, with the endpoint in `server.address`/`server.port`.

pub mod access_log;
pub mod body;
mod call;
mod error;
pub mod trace;

pub use call::{CallObs, Observer};
pub use error::ObserveError;
