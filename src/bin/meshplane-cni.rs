//! `meshplane-cni`, meshplane's CNI plugin (installed as `meshplane` in a
//! runtime's CNI bin directory by `meshplane cni install`): the runtime
//! runs it with `CNI_*` variables and the network configuration on stdin;
//! it asks the node over its admin socket and prints the result or error
//! object on stdout. Without `CNI_COMMAND` it says what it is on stderr.
//! Everything is in `meshplane_cni::plugin`.

fn main() {
    let (stdin, stdout, stderr) = (std::io::stdin(), std::io::stdout(), std::io::stderr());
    let code = meshplane_cni::plugin::run(&|k| std::env::var(k).ok(), stdin.lock(), stdout.lock(), stderr.lock());
    std::process::exit(code);
}
