//! ROS 2 on Zenoh without ROS: the messages the node publishes and reads, in CDR as
//! ROS 2 writes them ([`msgs`]), the RIHS01 type hashes that ROS 2 Jazzy and later put
//! in every key of `rmw_zenoh` ([`type_hash`]), and the keys, sample attachments and
//! liveliness tokens of `rmw_zenoh` ([`keys`]), result messages in ROS 2 form
//! ([`results`]) and camera images as frames ([`images`]).
mod cdr_read;
pub mod images;
pub mod keys;
pub mod msgs;
pub mod results;
pub mod type_hash;
