//! DNS messages: a query parsed defensively (every count checked against
//! the bytes before anything is allocated for it), and the answers built
//! with hickory-proto.
