;; attack_start_loop.wat — a start function that never returns.
;;
;; Why: issue 10, hole 12. The start function runs while the module is instantiated, before
;; any entrypoint; its infinite loop must end at the tenant's deadline as a 504 (timeout),
;; not as a 500 "failed to start".
(module
  (memory (export "memory") 1)

  (func $spin
    (loop $forever
      (br $forever)))

  (start $spin)

  (func (export "_start")))
