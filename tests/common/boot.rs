//! Boot emulator: plays the cloud's part for instances moto reports running (filled in next).
