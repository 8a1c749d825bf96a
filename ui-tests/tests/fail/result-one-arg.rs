type Result<T> = std::result::Result<T, std::io::Error>;

#[stem::task]
async fn read(path: String) -> Result<String> {
    Ok(path)
}

fn main() {}
