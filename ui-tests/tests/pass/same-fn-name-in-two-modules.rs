//! Two tasks named `send` in different modules get different names.
#![deny(warnings)]

mod email {
    #[stem::task]
    pub async fn send(to: String) {
        let _ = to;
    }
}

mod sms {
    #[stem::task]
    pub async fn send(to: String) {
        let _ = to;
    }
}

fn main() {
    assert_ne!(email::send::NAME, sms::send::NAME);
    assert!(email::send::NAME.ends_with("email::send"));
    assert!(sms::send::NAME.ends_with("sms::send"));
}
