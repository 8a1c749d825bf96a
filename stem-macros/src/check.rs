//! Checks of the function's shape, collected all at once (serde's `Ctxt`):
//! each error lands on the user's offending token.

use proc_macro2::{Span, TokenStream};
use quote::ToTokens;
use syn::visit::Visit;
use syn::{FnArg, Type};

use crate::ast::{self, Output, ParamKind, TaskFn};
use crate::attr::{BackoffKind, Options};
use crate::rules;

/// Every error found so far.
#[derive(Default)]
pub(crate) struct Errors {
    list: Vec<syn::Error>,
}

impl Errors {
    /// Records `message` at `span`.
    pub(crate) fn push(&mut self, span: Span, message: impl std::fmt::Display) {
        self.list.push(syn::Error::new(span, message));
    }

    /// Records `message` spanning all of `tokens`.
    pub(crate) fn push_spanned(&mut self, tokens: impl ToTokens, message: impl std::fmt::Display) {
        self.list.push(syn::Error::new_spanned(tokens, message));
    }

    /// Records a ready error.
    pub(crate) fn push_error(&mut self, error: syn::Error) {
        self.list.push(error);
    }

    /// How many errors so far.
    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    /// The one place errors become `compile_error!` invocations.
    pub(crate) fn into_compile_errors(self) -> TokenStream {
        self.list
            .into_iter()
            .map(syn::Error::into_compile_error)
            .collect()
    }
}

/// What the checks decided about expansion.
pub(crate) struct Plan {
    /// The signature is usable: generate the real task. Otherwise generate
    /// a stub module with the same items, and let the errors speak.
    pub(crate) signature_ok: bool,
    /// Per parameter: its type was rejected (the stub replaces it).
    pub(crate) bad_type: Vec<bool>,
    /// The output type was rejected (the stub uses `()`).
    pub(crate) bad_output: bool,
    /// The fn takes `self`: it sits in an `impl`, where no module may go.
    pub(crate) has_receiver: bool,
}

/// Names the generated module defines; a parameter type spelled with one of
/// them would resolve to the generated item instead of the user's type.
const GENERATED_TYPES: [&str; 4] = ["Args", "Output", "Task", "Builder"];

/// Checks the function and the cross-key option rules.
pub(crate) fn check(func: &TaskFn, options: &Options, errors: &mut Errors) -> Plan {
    let before = errors.len();
    let sig = &func.item.sig;

    if sig.asyncness.is_none() {
        errors.push(
            sig.fn_token.span,
            "#[stem::task] needs an `async fn`: write `async fn`",
        );
    }
    if let Some(unsafety) = &sig.unsafety {
        errors.push(unsafety.span, "a task cannot be an `unsafe fn`");
    }
    if let Some(abi) = &sig.abi {
        errors.push_spanned(abi, "a task cannot have an `extern` ABI");
    }
    if !sig.generics.params.is_empty() {
        errors.push_spanned(
            &sig.generics,
            "a task cannot be generic: its arguments are decoded into one concrete `Args` type; use concrete types",
        );
    }
    if let Some(wc) = &sig.generics.where_clause {
        errors.push_spanned(wc, "a task cannot have a `where` clause");
    }
    if let Some(variadic) = &sig.variadic {
        errors.push_spanned(variadic, "a task cannot be variadic");
    }

    let mut bad_type = Vec::new();
    let mut context_seen = false;
    let mut typed_index = 0usize;
    for arg in &sig.inputs {
        if let FnArg::Receiver(r) = arg {
            errors.push_spanned(
                r,
                "a task cannot take `self`: make it a free function and pass what it needs as arguments",
            );
            continue;
        }
        let param = &func.params[typed_index];
        let mut ok = true;
        if param.ident.is_none() && matches!(param.kind, ParamKind::Payload) {
            errors.push_spanned(
                &param.pat,
                "task parameters must be plain names (like `pair: (u32, u32)`), not patterns: each one becomes a field of `Args`",
            );
        }
        ok &= check_type(&param.ty, "parameter", errors);
        match &param.kind {
            ParamKind::Context if context_seen => {
                errors.push_spanned(&param.ty, "a task takes at most one `Context` parameter");
            }
            ParamKind::Context if typed_index != 0 => {
                context_seen = true;
                errors.push_spanned(
                    &param.ty,
                    "`Context` must be the first parameter of a task: move it before the others",
                );
            }
            ParamKind::Context => context_seen = true,
            ParamKind::State(_) | ParamKind::Payload => {}
        }
        bad_type.push(!ok);
        typed_index += 1;
    }

    if let Some(extra) = func.payload().nth(rules::MAX_TASK_ARGS) {
        errors.push_spanned(
            &extra.pat,
            format!(
                "a task takes at most {} arguments besides `Context` and `State`: group some of them in a struct",
                rules::MAX_TASK_ARGS
            ),
        );
    }

    let bad_output = match &func.output {
        Output::Unit => false,
        Output::Plain(ty) => {
            let ok = check_type(ty, "output", errors);
            if ok
                && let Some(seg) = ast::last_segment(ty)
                && seg.ident == "Result"
            {
                errors.push_spanned(
                    ty,
                    "write the task's result as `Result<T, E>` with both type arguments, so the error type is known",
                );
                true
            } else {
                !ok
            }
        }
        Output::Result { ok, err } => {
            let ok_ok = check_type(ok, "output", errors);
            let err_ok = check_type(err, "error", errors);
            !(ok_ok && err_ok)
        }
    };

    let signature_ok = errors.len() == before;
    // Generic parameters may appear in any type: the stub uses none of them.
    let generic = !sig.generics.params.is_empty();
    if generic {
        bad_type.iter_mut().for_each(|b| *b = true);
    }
    let bad_output = bad_output || generic;
    let has_receiver = sig.receiver().is_some();
    check_options(options, errors);
    Plan {
        signature_ok,
        bad_type,
        bad_output,
        has_receiver,
    }
}

/// Rejects types that cannot cross a broker or that the generated module
/// would misread; returns whether the type is usable.
fn check_type(ty: &Type, what: &str, errors: &mut Errors) -> bool {
    let mut finder = TypeProblems {
        what,
        errors,
        ok: true,
    };
    finder.visit_type(ty);
    finder.ok
}

struct TypeProblems<'a> {
    what: &'a str,
    errors: &'a mut Errors,
    ok: bool,
}

impl<'ast> Visit<'ast> for TypeProblems<'_> {
    fn visit_type_reference(&mut self, r: &'ast syn::TypeReference) {
        self.ok = false;
        let owned = match &*r.elem {
            Type::Path(p) if p.path.is_ident("str") => "`String`",
            Type::Slice(_) => "`Vec<T>`",
            Type::Path(p) if p.path.is_ident("Path") => "`PathBuf`",
            _ => "an owned type",
        };
        self.errors.push_spanned(
            r,
            format!(
                "borrowed task {}: it is decoded from the broker into an owned value; use {owned} instead",
                self.what
            ),
        );
    }

    fn visit_type_impl_trait(&mut self, t: &'ast syn::TypeImplTrait) {
        self.ok = false;
        self.errors.push_spanned(
            t,
            format!(
                "`impl Trait` is not allowed in a task {}: use a concrete type that serde can decode",
                self.what
            ),
        );
    }

    fn visit_type_trait_object(&mut self, t: &'ast syn::TypeTraitObject) {
        self.ok = false;
        self.errors.push_spanned(
            t,
            format!(
                "a trait object cannot be a task {}: use a concrete type that serde can decode",
                self.what
            ),
        );
    }

    fn visit_lifetime(&mut self, l: &'ast syn::Lifetime) {
        if l.ident != "static" {
            self.ok = false;
            self.errors.push_spanned(
                l,
                format!(
                    "borrowed task {}: it is decoded from the broker into an owned value; use `'static` or an owned type",
                    self.what
                ),
            );
        }
    }

    fn visit_type_path(&mut self, p: &'ast syn::TypePath) {
        if p.qself.is_none() && p.path.leading_colon.is_none() && p.path.segments.len() == 1 {
            let ident = &p.path.segments[0].ident;
            if ident == "Self" {
                self.ok = false;
                self.errors.push_spanned(
                    ident,
                    "`Self` is not allowed in a task: a task is a free function",
                );
            } else if GENERATED_TYPES.iter().any(|g| ident == g) {
                self.ok = false;
                self.errors.push_spanned(
                    ident,
                    format!(
                        "`{ident}` names an item of the module #[stem::task] generates, so it would not mean your type here: write its path (`crate::...::{ident}`) or import it under another name"
                    ),
                );
            }
        }
        syn::visit::visit_type_path(self, p);
    }
}

/// Rules between keys.
fn check_options(options: &Options, errors: &mut Errors) {
    let backoff = options.backoff.map(|b| b.value);
    if backoff == Some(BackoffKind::None) {
        for k in [&options.backoff_base, &options.backoff_max]
            .into_iter()
            .flatten()
        {
            errors.push(
                k.key,
                "this key has no effect with `backoff = none`, which retries at once: remove it, or choose `backoff = exponential` or `fixed`",
            );
        }
    }
    if backoff == Some(BackoffKind::Fixed)
        && let Some(max) = &options.backoff_max
    {
        errors.push(
            max.key,
            "`backoff = fixed` waits `backoff_base` every time; `backoff_max` only applies to `exponential`",
        );
    }
    if backoff != Some(BackoffKind::None)
        && backoff != Some(BackoffKind::Fixed)
        && let (Some(base), Some(max)) = (&options.backoff_base, &options.backoff_max)
        && max.value < base.value
    {
        errors.push(
            max.key,
            "`backoff_max` must not be shorter than `backoff_base`",
        );
    }
}
