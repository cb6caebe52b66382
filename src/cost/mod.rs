//! Cost metering: prices, the meter and reports.

pub mod prices;
