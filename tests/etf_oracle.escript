#!/usr/bin/env escript
%% -*- erlang -*-
%%! -noinput
%% Erlang as the reference for pymod_push.etf: a {packet,4} loop on stdin/stdout.
%%   {eval, Expr}           -> {ok, Plain, Compressed, MinorVersion0} for the term Expr builds,
%%                             which becomes the current term
%%   {check, Bytes}         -> true if binary_to_term(Bytes) =:= the current term
%%   {echo, Bytes, Options} -> term_to_binary(binary_to_term(Bytes), Options)
main(_) ->
    Port = open_port({fd, 0, 1}, [{packet, 4}, binary, eof]),
    loop(Port, undefined).

loop(Port, Current) ->
    receive
        {Port, {data, Frame}} ->
            {Reply, Next} = handle(binary_to_term(Frame), Current),
            Port ! {self(), {command, term_to_binary(Reply)}},
            loop(Port, Next);
        {Port, eof} ->
            halt(0)
    end.

handle({eval, Expr}, _) ->
    {ok, Tokens, _} = erl_scan:string(unicode:characters_to_list(Expr) ++ "."),
    {ok, Exprs} = erl_parse:parse_exprs(Tokens),
    {value, Term, _} = erl_eval:exprs(Exprs, []),
    {{ok, term_to_binary(Term), term_to_binary(Term, [compressed]),
      term_to_binary(Term, [{minor_version, 0}])}, Term};
handle({check, Bytes}, Current) ->
    {binary_to_term(Bytes) =:= Current, Current};
handle({echo, Bytes, Options}, Current) ->
    {term_to_binary(binary_to_term(Bytes), Options), Current}.
