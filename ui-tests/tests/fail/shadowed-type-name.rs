#[derive(serde::Serialize, serde::Deserialize)]
struct Task {
    title: String,
}

#[stem::task]
async fn create(task: Task) {
    let _ = task.title;
}

fn main() {}
