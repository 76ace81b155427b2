#![allow(dead_code)]
pub mod checker;
pub mod process;
pub mod sim;
