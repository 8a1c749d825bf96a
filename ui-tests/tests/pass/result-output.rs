//! `Result<T, E>` with the user's own error type: `Output` is `T`.
#![deny(warnings)]

#[derive(Debug)]
enum ChargeError {
    Declined,
}

impl std::fmt::Display for ChargeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Declined => f.write_str("card declined"),
        }
    }
}

#[stem::task(retries = 2)]
async fn charge(cents: u64) -> Result<String, ChargeError> {
    if cents == 0 {
        Err(ChargeError::Declined)
    } else {
        Ok(format!("ch_{cents}"))
    }
}

#[stem::task]
async fn with_std_result(n: u8) -> std::result::Result<(), std::io::Error> {
    let _ = n;
    Ok(())
}

#[stem::task]
async fn retry_later() -> Result<(), stem::Retry> {
    Err(stem::Retry::after(std::time::Duration::from_secs(1), "later"))
}

fn main() {
    let s: charge::Output = String::new();
    let _ = s;
    let _: with_std_result::Output = ();
    let _: retry_later::Output = ();
}
