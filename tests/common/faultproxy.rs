//! Fault-injecting HTTP proxy between the SDK and moto (filled in next).
