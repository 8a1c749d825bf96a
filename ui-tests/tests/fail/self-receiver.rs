struct Mailer;

impl Mailer {
    #[stem::task]
    async fn send(&self, to: String) {
        let _ = to;
    }
}

fn main() {}
