//! The `#[stem::task]` attribute macro. Use it through the `stem` crate
//! (`#[stem::task]`); [`task`] documents every attribute key.
//!
//! The macro runs in three steps, one file each:
//!
//! - `ast.rs` and `attr.rs` parse what the user wrote, keeping every span,
//! - `check.rs` validates it, collecting every error at once (the option
//!   rules themselves are in `rules.rs`, shared with `stem-core`),
//! - `expand.rs` generates the task module (or, when there were errors, a
//!   stub module with the same items so call sites stay quiet).

mod ast;
mod attr;
mod check;
mod expand;
use stem_rules as rules;

use proc_macro::TokenStream;

#[doc = include_str!("task.md")]
#[proc_macro_attribute]
pub fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    let item = proc_macro2::TokenStream::from(item);
    let mut errors = check::Errors::default();
    let args = attr::parse(attr.into(), &mut errors);
    let Some(func) = ast::TaskFn::parse(item.clone(), &mut errors) else {
        // Not a function at all: give the item back untouched with the error.
        let compile_errors = errors.into_compile_errors();
        return quote::quote!(#item #compile_errors).into();
    };
    let options = attr::Options::from_args(&args, &mut errors);
    let plan = check::check(&func, &options, &mut errors);
    let compile_errors = errors.into_compile_errors();
    expand::expand(&func, &options, &plan, compile_errors).into()
}

#[cfg(test)]
mod tests {
    /// `task.md` has a table row and a section for every key the parser
    /// accepts.
    #[test]
    fn the_docs_list_every_key() {
        let docs = include_str!("task.md");
        for key in crate::attr::key::ALL {
            let cell = format!("`{key}`");
            assert!(
                docs.contains(&format!("| {cell} |")),
                "no table row for {cell}"
            );
            assert!(
                docs.lines()
                    .any(|l| l.starts_with("## ") && l.contains(&cell)),
                "no section for {cell}"
            );
        }
    }
}
