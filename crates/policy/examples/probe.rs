use regorus::languages::rego::compiler::Compiler;
use regorus::rvm::RegoVM;
use regorus::{Engine, Value};

fn show(r: anyhow::Result<Value>) -> String {
    match r {
        Ok(Value::Undefined) => "undefined".into(),
        Ok(v) => v.to_json_str().unwrap().replace('\n', "").replace("  ", ""),
        Err(e) => format!("ERROR {e}"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let text = std::fs::read_to_string(&args[1]).unwrap();
    let rule = args[2].clone();
    let input: Option<Value> = args.get(3).map(|s| serde_json::from_str(s).unwrap());
    let mut engine = Engine::new();
    let t0 = std::time::Instant::now();
    engine.add_policy("p.rego".into(), text).unwrap();
    eprintln!("parse {:?}", t0.elapsed());
    let mut e2 = engine.clone();
    if let Some(i) = &input {
        e2.set_input(i.clone());
    }
    let t0 = std::time::Instant::now();
    println!("interp: {}", show(e2.eval_rule(rule.clone())));
    eprintln!("interp {:?}", t0.elapsed());
    let r: regorus::Rc<str> = rule.as_str().into();
    let compiled = match engine.compile_with_entrypoint(&r) {
        Ok(c) => c,
        Err(e) => {
            println!("compile error {e}");
            return;
        }
    };
    let t0 = std::time::Instant::now();
    let pr = Compiler::compile_from_policy(&compiled, &[rule.as_str()]);
    eprintln!("rvm compile {:?}", t0.elapsed());
    match pr {
        Ok(program) => {
            let mut vm = RegoVM::new_with_policy(compiled.clone());
            vm.load_program(program);
            vm.set_data(Value::new_object()).unwrap();
            if let Some(i) = &input {
                vm.set_input(i.clone());
            }
            println!(
                "rvm:    {}",
                show(vm.execute().map_err(|e| anyhow::anyhow!("{e}")))
            );
        }
        Err(e) => println!("rvm compile error: {e}"),
    }
}
