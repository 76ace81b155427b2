#![allow(dead_code)]
pub mod process;
pub mod sim;
