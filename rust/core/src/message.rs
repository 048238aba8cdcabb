//! The unit of work between shards: a [`Message`] crosses the request ring
//! to its target, runs there, and crosses back on the response ring to its
//! origin. The runtime only moves boxes; what they do is theirs.

/// A unit of work one shard hands another. The runtime moves the box
/// through the rings; its two methods say what happens at each end. Calls made
/// with [`submit_to`](crate::submit_to) are messages; other layers (such as
/// language bindings, through [`crate::embed`]) define their own.
pub trait Message: Send + 'static {
    /// Runs on the target shard, inside its poll loop. It must hand `self`
    /// back to its origin with [`respond`](crate::embed::respond), at once
    /// or later from a task of the target shard: the origin counts it as in
    /// flight, and shutdown waits for it, until it is back.
    fn run(self: Box<Self>);

    /// Runs on the origin shard, inside its poll loop, once the message is
    /// back. The box is freed here, on the shard that allocated it.
    fn complete(self: Box<Self>);
}

/// What travels the rings.
pub(crate) type Envelope = Box<dyn Message>;
