//! The generated module has the fn's visibility and its items are one level
//! wider, so they are usable wherever the fn itself is.
#![deny(warnings)]

mod outer {
    pub(crate) mod inner {
        #[stem::task]
        async fn private(n: u32) {
            let _ = n;
        }

        #[stem::task]
        pub(super) async fn for_parent(n: u32) {
            let _ = n;
        }

        #[stem::task]
        pub(crate) async fn for_crate(n: u32) {
            let _ = n;
        }

        #[stem::task]
        pub async fn public(n: u32) {
            let _ = n;
        }

        #[stem::task]
        pub(in crate::outer) async fn in_path(n: u32) {
            let _ = n;
        }

        #[stem::task]
        pub(self) async fn self_vis(n: u32) {
            let _ = n;
        }

        pub(crate) fn use_here() -> u32 {
            let _ = private::with().priority(1);
            let _ = (private::NAME, self_vis::OPTIONS);
            private::Args { n: 1 }.n + self_vis::Args { n: 1 }.n
        }
    }

    // Where the fn is visible, so are its generated items.
    pub(crate) fn use_in_parent() -> u32 {
        let _ = inner::for_parent::with().priority(1);
        inner::for_parent::Args { n: 2 }.n
            + inner::in_path::Args { n: 2 }.n
            + inner::use_here()
    }
}

fn main() {
    let e = outer::inner::for_crate::Args { n: 3 };
    let f = outer::inner::public::Args { n: 4 };
    let _ = (e.n, f.n, outer::use_in_parent());
    let _ = outer::inner::for_crate::signature(1);
}
