//! pdu
